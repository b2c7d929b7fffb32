"""The "Export" dock widget: write a slide's tile scores as CSV, AnnData (.h5ad), QuPath GeoJSON tiles or
heatmap TIFFs.

Only wiring: the files are written by :class:`napari_he2rna.maps.session.SlideSession` (atomically, via
:mod:`napari_he2rna.maps.exports`). The names offered are the genes/sets painted on the picked slide (its
heatmap layers); more can be typed. An existing file is replaced only after the user says so; every outcome is
a notification naming the written path(s), or the one-sentence reason it failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ..errors import He2rnaError
from ..maps import exports, gene_sets
from ..maps.exports import safe_name
from ._dock_fit import elide_middle
from ._pickers import SlideLayerPicker
from ._state import SlideState, get_registry, layer_info

if TYPE_CHECKING:
    import napari


class ExportWidget(QWidget):
    """Pick painted genes/sets of a slide and export their tile scores.

    Parameters
    ----------
    napari_viewer
        The viewer (napari passes it to dock widgets).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.registry = get_registry(napari_viewer)
        self.slide_picker = SlideLayerPicker(napari_viewer)
        self.names_list = QListWidget()
        self.names_list.setToolTip("The genes / gene sets painted on this slide; tick those to export")
        # as tall as its names (the dock scrolls, the list does not)
        self.names_list.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.names_list.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
        self.extra_edit = QLineEdit()
        self.extra_edit.setPlaceholderText("more genes or sets, comma-separated (optional)")
        self.csv_button = QPushButton("Export tile scores (CSV)…")
        self.h5ad_button = QPushButton("Export AnnData (.h5ad)…")
        self.h5ad_button.setToolTip(
            "Tiles x genes/sets for scanpy/squidpy: scores in X, the tile table in obs, "
            'obsm["spatial"] in level-0 px and obsm["spatial_um"] in µm, the metadata in uns'
        )
        self.geojson_button = QPushButton("Export tiles for QuPath (GeoJSON)…")
        self.tiff_button = QPushButton("Export heatmap (TIFF)…")
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.result_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self._last_dir: Path | None = None

        form = QFormLayout()
        form.addRow("slide", self.slide_picker.native)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(QLabel("Genes / gene sets:"))
        layout.addWidget(self.names_list)
        layout.addWidget(self.extra_edit)
        for button in (self.csv_button, self.h5ad_button, self.geojson_button, self.tiff_button):
            layout.addWidget(button)
        layout.addWidget(self.result_label)
        layout.addStretch(1)

        self.slide_picker.changed.connect(self.refresh)
        self.registry.changed.connect(self.refresh)
        self.csv_button.clicked.connect(lambda: self.export_csv())
        self.h5ad_button.clicked.connect(lambda: self.export_h5ad())
        self.geojson_button.clicked.connect(lambda: self.export_geojson())
        self.tiff_button.clicked.connect(lambda: self.export_tiff())
        self.refresh()

    # ------------------------------------------------------------------ state
    def current_state(self) -> SlideState | None:
        layer = self.slide_picker.value
        if layer is None or layer not in self.viewer.layers:
            return None
        return self.registry.get(layer)

    def painted_names(self) -> list[str]:
        """The gene/set names with a heatmap layer on the picked slide, in layer order."""
        state = self.current_state()
        if state is None:
            return []
        names = [layer_info(ly).get("name") for ly in self.registry.layers_of(state, "heatmap")]
        return list(dict.fromkeys(n for n in names if n))

    def refresh(self, *_: Any) -> None:
        """Refill the name list (keeping ticks; new names come ticked)."""
        unticked = {
            self.names_list.item(i).text()
            for i in range(self.names_list.count())
            if self.names_list.item(i).checkState() != Qt.CheckState.Checked
        }
        self.names_list.clear()
        for name in self.painted_names():
            item = QListWidgetItem(name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Unchecked if name in unticked else Qt.CheckState.Checked)
            self.names_list.addItem(item)
        self._fit_list()

    def _fit_list(self) -> None:
        """The name list as tall as its rows (two at least, so it reads as a list when empty)."""
        lst = self.names_list
        row = lst.sizeHintForRow(0) if lst.count() else lst.fontMetrics().height() + 4
        lst.setFixedHeight(max(lst.count(), 2) * row + 2 * lst.frameWidth() + 4)

    def set_checked(self, names: Sequence[str]) -> None:
        """Tick exactly ``names`` in the list."""
        wanted = set(names)
        for i in range(self.names_list.count()):
            item = self.names_list.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.text() in wanted else Qt.CheckState.Unchecked)

    def chosen_names(self) -> list[str]:
        """Ticked names, then the typed extra ones."""
        names = [
            self.names_list.item(i).text()
            for i in range(self.names_list.count())
            if self.names_list.item(i).checkState() == Qt.CheckState.Checked
        ]
        names += gene_sets.split_names(self.extra_edit.text())
        return list(dict.fromkeys(names))

    def _ready_state(self) -> tuple[SlideState, list[str]] | None:
        state = self.current_state()
        if state is None or not state.session.ready:
            show_error("Run the model on a slide first (Model widget), then paint or type genes to export.")
            return None
        names = self.chosen_names()
        if not names:
            show_error("Tick or type at least one gene or gene set to export.")
            return None
        return state, names

    # ------------------------------------------------------------------ dialogs
    def _default_path(self, state: SlideState, suffix: str) -> str:
        slide_path = Path(state.session.slide.path)
        folder = self._last_dir or slide_path.parent
        return str(folder / f"{slide_path.stem}{suffix}")

    def _ask_save(self, title: str, default: str, filt: str) -> Path | None:
        # We ask about existing files ourselves (also for the CSV's side file), so Qt must not ask too.
        path, _ = QFileDialog.getSaveFileName(
            self, title, default, filt, options=QFileDialog.Option.DontConfirmOverwrite
        )
        return Path(path) if path else None

    def confirm_overwrite(self, paths: Sequence[Path]) -> bool:
        """True when none of ``paths`` exists or the user agrees to replace those that do."""
        existing = [p for p in paths if p is not None and Path(p).exists()]
        if not existing:
            return True
        listing = "\n".join(str(p) for p in existing)
        answer = QMessageBox.question(
            self,
            "Replace existing files?",
            f"These files exist already:\n{listing}\n\nReplace them?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def _done(self, paths: Sequence[Path]) -> None:
        text = "Wrote " + ", ".join(str(p) for p in paths)
        # the dock is narrow: the file names, then their folder shortened (the full paths in the tooltip)
        folders = list(dict.fromkeys(str(Path(p).parent) for p in paths))
        where = "; ".join(elide_middle(f, 36) for f in folders)
        self.result_label.setText(f"Wrote {', '.join(Path(p).name for p in paths)} in {where}")
        self.result_label.setToolTip("\n".join(str(p) for p in paths))
        self._last_dir = Path(paths[0]).parent
        show_info(text)

    # ------------------------------------------------------------------ exports
    def export_csv(self, path: str | Path | None = None) -> list[Path] | None:
        """Write the chosen names' tile scores (one row per tile) and the slide-level side file.

        ``path`` None asks with a save dialog. Returns the written paths, or None (cancelled or error).
        """
        ready = self._ready_state()
        if ready is None:
            return None
        state, names = ready
        path = (
            Path(path)
            if path
            else self._ask_save(
                "Export tile scores", self._default_path(state, "_tile_scores.csv"), "CSV (*.csv)"
            )
        )
        if path is None:
            return None
        if path.suffix.lower() != ".csv":
            path = path.with_name(path.name + ".csv")
        if not self.confirm_overwrite([path, exports.slide_csv_path(path), exports.tile_metadata_path(path)]):
            return None
        try:
            written = state.session.export_csv(path, names, overwrite=True)
        except He2rnaError as exc:
            show_error(str(exc))
            return None
        paths = [Path(p) for p in written if p is not None]
        self._done(paths)
        return paths

    def _export_file(
        self, path: str | Path | None, dialog: tuple[str, str, str], write: Any, suffix: str = ""
    ) -> Path | None:
        """One file of the chosen names: ``dialog`` = (title, default suffix, filter) when ``path`` is None;
        ``write(session, path, names)`` writes it (only after the user agreed to replace an existing file);
        ``suffix`` is added to a name without it. Any failure is one sentence in a notification."""
        ready = self._ready_state()
        if ready is None:
            return None
        state, names = ready
        title, default, filt = dialog
        path = Path(path) if path else self._ask_save(title, self._default_path(state, default), filt)
        if path is None:
            return None
        if suffix and path.suffix.lower() != suffix:
            path = path.with_name(path.name + suffix)
        if not self.confirm_overwrite([path]):
            return None
        try:
            written = Path(write(state.session, path, names))
        except He2rnaError as exc:
            show_error(str(exc))
            return None
        except Exception as exc:  # e.g. an HDF5 error: still one sentence, no traceback
            show_error(f"the export to {path} failed: {exc.__class__.__name__}: {exc}")
            return None
        self._done([written])
        return written

    def export_h5ad(self, path: str | Path | None = None) -> Path | None:
        """Write the tiles as AnnData (``.h5ad``): the chosen names' scores in ``X``, the tiles in ``obs``.

        ``path`` None asks with a save dialog. Returns the written path, or None (cancelled or error).
        """
        return self._export_file(
            path,
            ("Export AnnData", "_tiles.h5ad", "AnnData (*.h5ad)"),
            lambda session, p, names: session.export_h5ad(p, names, overwrite=True),
            suffix=".h5ad",
        )

    def export_geojson(self, path: str | Path | None = None) -> Path | None:
        """Write the tiles as QuPath GeoJSON with the chosen names' scores as measurements."""
        return self._export_file(
            path,
            ("Export tiles for QuPath", "_tiles.geojson", "GeoJSON (*.geojson *.json)"),
            lambda session, p, names: session.export_geojson(p, names, overwrite=True),
        )

    def export_tiff(self, path: str | Path | None = None) -> list[Path] | None:
        """Write one georeferenced float32 TIFF heatmap per chosen name.

        With one name ``path`` is the file; with several it is a folder (files ``<slide>_<name>.tif``).
        """
        ready = self._ready_state()
        if ready is None:
            return None
        state, names = ready
        stem = Path(state.session.slide.path).stem
        if len(names) == 1:
            target = (
                Path(path)
                if path
                else self._ask_save(
                    "Export heatmap",
                    self._default_path(state, f"_{safe_name(names[0])}.tif"),
                    "TIFF (*.tif *.tiff)",
                )
            )
            if target is None:
                return None
            targets = {names[0]: target}
        else:
            folder = path or QFileDialog.getExistingDirectory(
                self,
                "Folder for the heatmap TIFFs",
                str(self._last_dir or Path(state.session.slide.path).parent),
            )
            if not folder:
                return None
            targets = {n: Path(folder) / f"{stem}_{safe_name(n)}.tif" for n in names}
        if not self.confirm_overwrite(list(targets.values())):
            return None
        written = []
        try:
            for name, target in targets.items():
                written.append(Path(state.session.export_heatmap_tiff(target, name, overwrite=True)))
        except He2rnaError as exc:
            show_error(str(exc))
            return None
        self._done(written)
        return written
