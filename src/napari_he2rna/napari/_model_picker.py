"""The Model dock's "Slide and model" box: the slide layer, the model bundle and the device.

The model list holds the bundled demo model and every bundle opened (**Open model…**); the label under it
describes the loaded bundle, and a red line says when it is the demo model (trained on synthetic slides).
Loading a bundle is the dock's (:meth:`ModelWidget.load_model`); this box shows the result.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
)

from ..maps import readout
from ..maps.session import default_model_path
from ._pickers import SlideLayerPicker

if TYPE_CHECKING:
    import napari

    from ..model.bundle import ModelBundle

DEMO_WARNING = "DEMO: trained on synthetic slides, means nothing on real tissue"
DEVICES = ("auto", "cuda", "cpu")
#: describe()'s sentence on the median R over every gene and type (control genes drag it down).
_ALL_R_SENTENCE = re.compile(r"\s*Median cross-validated R per gene and cancer type: [-+0-9.naN]+\.")


def model_text(bundle: ModelBundle) -> str:
    """The model label: the bundle's description with the median validation R of its reliable (marked)
    genes (:func:`readout.r_summary`) instead of the median over every gene and type; without the demo
    sentence, which the red label says more visibly."""
    text = _ALL_R_SENTENCE.sub("", bundle.describe().split(" DEMO MODEL:")[0])
    summary = readout.r_summary(bundle)
    return f"{text} {summary}" if summary else text


class ModelPicker(QGroupBox):
    """Slide layer, model bundle (list, Open model…, description, demo warning) and device."""

    #: A model bundle was chosen in the Open dialog: its path.
    model_opened = Signal(str)

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__("Slide and model")
        self.slide_picker = SlideLayerPicker(napari_viewer)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Model bundle (.safetensors)")
        self.open_model_button = QPushButton("Open model…")
        self.model_label = QLabel("No model loaded.")
        self.model_label.setWordWrap(True)
        self.model_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.demo_label = QLabel(DEMO_WARNING)
        self.demo_label.setWordWrap(True)
        self.demo_label.setStyleSheet("color: #ff4040; font-weight: bold;")
        self.demo_label.setVisible(False)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        self._setup_devices()

        box_layout = QVBoxLayout(self)
        form = QFormLayout()
        form.addRow("slide", self.slide_picker.native)
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(self.open_model_button)
        form.addRow("model", row)
        form.addRow("device", self.device_combo)
        box_layout.addLayout(form)
        # Wrapped labels outside the form layout, which clips their height.
        box_layout.addWidget(self.model_label)
        box_layout.addWidget(self.demo_label)
        self.open_model_button.clicked.connect(self._open_model_clicked)

    def _setup_devices(self) -> None:
        try:
            import torch

            cuda = bool(torch.cuda.is_available())
        except Exception:  # noqa: BLE001 - a broken torch install just means "no CUDA" here
            cuda = False
        item = self.device_combo.model().item(DEVICES.index("cuda"))
        if not cuda and item is not None:
            item.setEnabled(False)
            item.setToolTip("No CUDA GPU is available to PyTorch")

    def _open_model_clicked(self) -> None:
        start = str(Path(self.model_combo.currentData() or default_model_path()).parent)
        path, _ = QFileDialog.getOpenFileName(
            self, "Open a model bundle", start, "Model bundles (*.safetensors);;All files (*)"
        )
        if path:
            self.model_opened.emit(path)

    def show_bundle(self, path: Path, bundle: ModelBundle) -> None:
        """A bundle was loaded from ``path``: select it in the list (added if new) and describe it."""
        idx = self.model_combo.findData(str(path))
        if idx < 0:
            self.model_combo.addItem(path.name, str(path))
            idx = self.model_combo.count() - 1
        self.model_combo.setCurrentIndex(idx)
        self.model_combo.setToolTip(str(path))
        self.model_label.setText(model_text(bundle))
        self.demo_label.setVisible(bool(bundle.demo))
