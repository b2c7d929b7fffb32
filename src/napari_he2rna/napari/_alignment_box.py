"""The Compare dock's "Alignment" box: the truth scan's placement on the slide, typed or found automatically.

The fields (offset, scale, rotation) and the affine line describe one
:class:`~napari_he2rna.validation.transform.Alignment` (truth µm -> slide µm); a typed affine fills the fields
and keeps what they cannot say as stretch/shear. The truth scan itself, when it is a consecutive section
scanned apart (an IHC), is shown over the H&E as a layer placed by the alignment, and **Align
automatically** registers it onto the H&E (:func:`napari_he2rna.validation.align.align_slides`) in a napari
``thread_worker`` with progress and Cancel; a failed alignment is a sentence in the label and leaves the
fields as they were. Moving the truth layer and recomputing is the dock's (:attr:`AlignmentBox.changed`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_info
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
)

from ..errors import Cancelled, DataError, He2rnaError, SlideError
from ..slides.slide import open_slide
from ..validation import align
from ..validation.comparison import layer_affine
from ..validation.transform import Alignment
from ._state import META_KEY

if TYPE_CHECKING:
    import napari


class _AlignSignals(QObject):
    """Progress of the alignment worker, carried to the GUI thread (a queued connection)."""

    progressed = Signal(int, int, str)


def _align_job(fixed, moving, cancel: threading.Event, signals: _AlignSignals):
    """Run in the worker: the result, or the user-facing error as a value (napari would add a traceback)."""
    try:
        return align.align_slides(
            fixed,
            moving,
            progress=lambda d, t, m="": signals.progressed.emit(int(d), int(t), str(m)),
            cancel=cancel,
        )
    except He2rnaError as exc:
        return exc


def _parse_affine(text: str) -> np.ndarray:
    """Six numbers ``a b tx c d ty`` (commas, semicolons or spaces) as a 3x3 matrix, else DataError."""
    parts = text.replace(";", " ").replace(",", " ").split()
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 6:
        raise DataError("type the affine as six numbers: a b tx c d ty (µm; slide = [a b; c d] truth + t)")
    return np.array([values[:3], values[3:], [0.0, 0.0, 1.0]])


class AlignmentBox(QGroupBox):
    """Offset / scale / rotation fields, the affine line, Reset; the IHC slide, its layer, and the automatic
    alignment's worker.

    Parameters
    ----------
    napari_viewer
        The viewer the IHC layer goes to.
    slide_layer
        ``() -> layer | None``: the H&E slide layer picked in the dock (the alignment's fixed image).
    """

    #: The alignment changed (a field, the affine line, Reset, or a found transform).
    changed = Signal()
    #: Something the user asked for failed (an affine not understood, an IHC not opened): the sentence.
    failed = Signal(str)

    def __init__(self, napari_viewer: napari.viewer.Viewer, slide_layer: Callable[[], Any]) -> None:
        super().__init__("Alignment (truth → slide, µm)")
        self.viewer = napari_viewer
        self._slide_layer = slide_layer
        # The IHC (truth scan) slide, its layer, the stretch/shear left of the affine, the alignment job.
        self.ihc_slide = None
        self.ihc_layer = None
        self._shape = np.eye(2)
        self.align_result: align.AlignmentResult | None = None
        self.align_worker = None
        self._align_cancel: threading.Event | None = None
        self._align_signals = _AlignSignals()
        self._align_signals.progressed.connect(self._on_align_progress)

        aform = QFormLayout(self)
        self.offset_x = self._spin(-1e6, 1e6, 2, " µm", "Shift of the truth along x, µm")
        self.offset_y = self._spin(-1e6, 1e6, 2, " µm", "Shift of the truth along y, µm")
        # enough decimals that a found transform survives the fields (1e-6 of a 100,000 px slide: 0.1 px)
        self.scale_spin = self._spin(0.001, 1000.0, 6, "", "Scale of the truth scan onto the slide")
        self.scale_spin.setValue(1.0)
        self.scale_spin.setSingleStep(0.01)
        self.rotation_spin = self._spin(-180.0, 180.0, 5, "°", "Rotation, anticlockwise on screen")
        self.reset_align = QPushButton("Reset alignment")
        self.affine_edit = QLineEdit()
        self.affine_edit.setToolTip(
            "The whole affine, truth µm -> slide µm, as six numbers a b tx c d ty; edit and press Enter "
            "(offset, scale and rotation follow; what is left is kept as stretch/shear)"
        )
        self.align_button = QPushButton("Align automatically")
        self.align_button.setToolTip(
            "Register the IHC slide onto the H&E (haematoxylin, rotation search, affine, mutual information)"
        )
        self.align_cancel_button = QPushButton("Cancel")
        self.align_cancel_button.setEnabled(False)
        self.align_progress = QProgressBar()
        self.align_progress.setRange(0, 1)
        self.align_progress.setValue(0)
        self.align_label = QLabel("")
        self.align_label.setWordWrap(True)
        aform.addRow("offset x", self.offset_x)
        aform.addRow("offset y", self.offset_y)
        aform.addRow("scale", self.scale_spin)
        aform.addRow("rotation", self.rotation_spin)
        aform.addRow("affine", self.affine_edit)
        align_row = QHBoxLayout()
        align_row.addWidget(self.align_button)
        align_row.addWidget(self.align_cancel_button)
        aform.addRow(align_row)
        aform.addRow(self.align_progress)
        aform.addRow(self.align_label)
        aform.addRow(self.reset_align)

        for spin in (self.offset_x, self.offset_y, self.scale_spin, self.rotation_spin):
            spin.valueChanged.connect(self._alignment_changed)
        self.reset_align.clicked.connect(self.reset_alignment)
        self.affine_edit.editingFinished.connect(self._affine_edited)
        self.align_button.clicked.connect(lambda: self.align_automatically())
        self.align_cancel_button.clicked.connect(self.cancel_alignment)

    @staticmethod
    def _spin(lo: float, hi: float, decimals: int, suffix: str, tip: str) -> QDoubleSpinBox:
        spin = QDoubleSpinBox()
        spin.setRange(lo, hi)
        spin.setDecimals(decimals)
        spin.setSuffix(suffix)
        spin.setToolTip(tip)
        spin.setKeyboardTracking(False)  # typing "112" must not recompute at "1" and "11"
        return spin

    # ------------------------------------------------------------------ the fields
    def alignment(self) -> Alignment:
        """The alignment set in the widget (truth scan -> slide, µm)."""
        return Alignment.from_offset_scale(
            (self.offset_x.value(), self.offset_y.value()),
            self.scale_spin.value(),
            self.rotation_spin.value(),
            shape=None if np.allclose(self._shape, np.eye(2)) else self._shape,
        )

    def show_affine(self) -> None:
        a = self.alignment().affine
        text = " ".join(f"{v:.6g}" for v in (a[0, 0], a[0, 1], a[0, 2], a[1, 0], a[1, 1], a[1, 2]))
        if self.affine_edit.text() != text:
            self.affine_edit.setText(text)

    def _affine_edited(self) -> None:
        current = self.alignment().affine
        try:
            typed = _parse_affine(self.affine_edit.text())
            if np.allclose(typed, current, rtol=1e-6, atol=1e-6):
                return
            self.set_affine(typed)
        except He2rnaError as exc:
            self.failed.emit(str(exc))
            self.show_affine()

    def set_affine(self, affine_um: Any) -> None:
        """Set the alignment to a full 3x3 affine (truth µm -> slide µm): fields and stretch/shear follow."""
        offset, scale, rotation, shape = Alignment.from_affine(affine_um).to_offset_scale()
        self._shape = np.asarray(shape, dtype=float)
        self.set_alignment(offset, scale, rotation)

    def _alignment_changed(self, *args) -> None:
        self.changed.emit()

    def reset_alignment(self) -> None:
        self._shape = np.eye(2)
        for spin, value in ((self.offset_x, 0.0), (self.offset_y, 0.0), (self.scale_spin, 1.0)):
            spin.blockSignals(True)
            spin.setValue(value)
            spin.blockSignals(False)
        self.rotation_spin.setValue(0.0)  # one signal for the lot
        self._alignment_changed()

    def place_ihc_layer(self) -> None:
        """Show the alignment in the affine line and put the IHC layer where it says."""
        self.show_affine()
        if self.ihc_layer is not None and self.ihc_layer in self.viewer.layers:
            self.ihc_layer.affine = layer_affine(self.alignment())

    def set_alignment(self, offset_um=(0.0, 0.0), scale: float = 1.0, rotation_deg: float = 0.0) -> None:
        """Set the alignment fields (one update of the layer and one recompute)."""
        for spin, value in (
            (self.offset_x, offset_um[0]),
            (self.offset_y, offset_um[1]),
            (self.scale_spin, scale),
            (self.rotation_spin, rotation_deg),
        ):
            spin.blockSignals(True)
            spin.setValue(float(value))
            spin.blockSignals(False)
        self._alignment_changed()

    # ------------------------------------------------------------------ IHC
    def load_ihc_slide(self, path: str | Path) -> bool:
        """Open the IHC (truth scan) slide and show it over the H&E (the dock places it)."""
        from ._reader import slide_layer_data

        slide_layer = self._slide_layer()
        try:
            if slide_layer is None:
                raise DataError("open the H&E slide first, then its IHC")
            slide = open_slide(path)
        except (SlideError, DataError) as exc:
            self.failed.emit(str(exc))
            return False
        data, kwargs, _ = slide_layer_data(slide, name=f"{slide.path.name} (IHC)")
        fixed_mpp = slide_layer.metadata["slide"].mpp or 1.0
        kwargs["metadata"] = {META_KEY: {"kind": "ihc", "name": kwargs["name"]}, "ihc_slide": slide}
        kwargs["scale"] = (fixed_mpp, fixed_mpp)  # IHC px at the H&E's µm/px, as the alignment works
        kwargs["units"] = tuple(slide_layer.units)
        if self.ihc_layer is not None and self.ihc_layer in self.viewer.layers:
            self.viewer.layers.remove(self.ihc_layer)
        if self.ihc_slide is not None:
            self.ihc_slide.close()
        self.ihc_slide = slide
        self.ihc_layer = self.viewer.add_image(data, opacity=0.5, **kwargs)
        self.align_label.setText(f"IHC: {slide.path.name}; press Align automatically, or set the fields.")
        return True

    def layer_removed(self, layer: Any) -> None:
        """A layer left the viewer: forget the IHC layer if it was that one."""
        if layer is not None and layer is self.ihc_layer and layer not in self.viewer.layers:
            self.ihc_layer = None  # the IHC slide stays open: Align automatically still works

    # ------------------------------------------------------------------ automatic alignment
    @property
    def aligning(self) -> bool:
        """True while an automatic alignment runs."""
        return self.align_worker is not None

    def align_automatically(self):
        """Register the IHC slide onto the H&E in a worker; returns the worker (None if not started)."""
        from napari.qt.threading import create_worker

        if self.aligning:
            show_info("An alignment is already running; cancel it or wait.")
            return None
        slide_layer = self._slide_layer()
        if slide_layer is None or self.ihc_slide is None:
            self.failed.emit("load the IHC slide first (Load IHC slide…), over an open H&E slide")
            return None
        cancel = threading.Event()
        self._align_cancel = cancel
        self.align_progress.setRange(0, 0)
        self.align_label.setText("Aligning…")
        worker = create_worker(
            _align_job,
            slide_layer.metadata["slide"],
            self.ihc_slide,
            cancel,
            self._align_signals,
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.returned.connect(self._on_align_returned)
        worker.errored.connect(self._on_align_errored)
        worker.finished.connect(self._on_align_finished)
        self.destroyed.connect(lambda *_, c=cancel: c.set())
        self.align_worker = worker
        self.align_button.setEnabled(False)
        self.align_cancel_button.setEnabled(True)
        worker.start()
        return worker

    def cancel_alignment(self) -> None:
        """Stop the alignment in flight (the fields stay as they were)."""
        if self._align_cancel is not None:
            self._align_cancel.set()
            self.align_label.setText("Cancelling…")

    def _on_align_progress(self, done: int, total: int, message: str) -> None:
        self.align_progress.setRange(0, max(total, 1))
        self.align_progress.setValue(min(done, total))
        if self.aligning and message:
            self.align_label.setText(f"Aligning: {message}…")

    def _on_align_returned(self, result) -> None:
        if isinstance(result, Cancelled):
            self.align_label.setText("Alignment cancelled; the fields are unchanged.")
            return
        if isinstance(result, He2rnaError):
            self.align_label.setText(f"{result} (the fields are unchanged)")
            return
        self.align_result = result
        slide_layer = self._slide_layer()
        mpp = slide_layer.metadata["slide"].mpp if slide_layer is not None else None
        self.set_affine(Alignment.from_affine_px(result.affine_px, mpp or 1.0).affine)
        self.align_label.setText(f"Aligned: {result.summary()}")

    def _on_align_errored(self, exc: Exception) -> None:  # a bug in the alignment: still one sentence
        self.align_label.setText(f"the alignment failed: {exc.__class__.__name__}: {exc}")

    def _on_align_finished(self) -> None:
        self.align_worker = None
        self._align_cancel = None
        self.align_progress.setRange(0, 1)
        self.align_progress.setValue(1)
        self.align_button.setEnabled(True)
        self.align_cancel_button.setEnabled(False)
