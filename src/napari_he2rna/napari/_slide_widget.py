"""The "Slide" dock widget: open a slide, see its facts, give or correct its pixel size (µm/px).

It only wires magicgui widgets to :mod:`napari_he2rna.slides.slide` and to the same layer-building code as the
reader (:func:`~napari_he2rna.napari._reader.open_slide_layer`); errors become notifications.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import Container, FileEdit, Label, LineEdit, PushButton
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLineEdit

from ..errors import SlideError
from ..slides.slide import SLIDE_SUFFIXES, Slide, validate_mpp
from ..slides.tiling import slide_masks
from ._reader import open_slide_layer
from ._state import get_registry, is_slide_layer

if TYPE_CHECKING:
    import napari

_FILTER = "Slides (" + " ".join(f"*{s}" for s in SLIDE_SUFFIXES) + ");;All files (*)"


class SlideWidget(Container):
    """Pick a slide file, show vendor / dimensions / levels / µm/px / objective, set the µm/px.

    The facts shown follow the active layer like the other widgets: a slide layer's own, a heatmap's or tile
    outline's slide, else the last slide opened here, else the top slide layer of the viewer (one opened with
    ``viewer.open`` or File > Open).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self.viewer = napari_viewer
        self.file = FileEdit(label="slide file", mode="r", filter=_FILTER)
        self.open_button = PushButton(text="Open slide")
        self.facts = Label(label="", value="No slide open.")
        self.mpp = LineEdit(label="µm/px", tooltip="µm per level-0 pixel; overrides what the file says")
        self.mpp_button = PushButton(text="Set µm/px")
        self.mask_button = PushButton(
            text="Show tissue mask",
            tooltip="the tissue the tiles are cut from, and the pen ink removed from it",
        )
        super().__init__(
            widgets=[self.file, self.open_button, self.facts, self.mpp, self.mpp_button, self.mask_button],
            labels=True,
        )
        # A narrow dock: the facts wrap (the levels line is long) and rows keep their natural height.
        self.facts.native.setWordWrap(True)
        self.facts.native.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.native.layout().addStretch(1)
        self._path_edit = self.file.native.findChild(QLineEdit)
        self._layer = None
        self.open_button.changed.connect(self._open_clicked)
        self.mpp_button.changed.connect(self._set_mpp_clicked)
        self.mpp.native.returnPressed.connect(self._set_mpp_clicked)
        self.mask_button.changed.connect(self._mask_clicked)
        self.viewer.layers.selection.events.active.connect(self._active_changed)
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self._active_changed)
        self._active_changed()

    # ------------------------------------------------------------------ state
    @property
    def slide_layer(self):
        """The slide layer the widget is about: the active one if it shows a slide, else the last opened."""
        active = self.viewer.layers.selection.active
        if active is not None and isinstance(active.metadata.get("slide"), Slide):
            return active
        if active is not None:  # a heatmap or tile outline: its slide
            state = get_registry(self.viewer).state_of_layer(active)
            if state is not None and state.layer in self.viewer.layers:
                return state.layer
        if self._layer is not None and self._layer in self.viewer.layers:
            return self._layer
        slides = [ly for ly in self.viewer.layers if is_slide_layer(ly)]
        return slides[-1] if slides else None

    def _active_changed(self, event=None) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Show the facts of :attr:`slide_layer` (or that no slide is open)."""
        layer = self.slide_layer
        if layer is None:
            self.facts.value = "No slide open."
            return
        slide: Slide = layer.metadata["slide"]
        facts = {"layer": layer.name, **slide.facts()}
        facts.pop("file", None)  # in the file field
        self.facts.value = "\n".join(f"{key}: {value}" for key, value in facts.items())
        self.mpp.value = f"{slide.mpp:g}" if slide.mpp is not None else ""
        self._show_file(Path(slide.path))

    def _show_file(self, path: Path) -> None:
        """The slide file field shows the file of the slide shown (its end: the name), unless the user has
        put another file there to open."""
        typed = str(self.file.value) if self.file.value is not None else ""
        if typed not in ("", ".") and Path(typed).resolve() not in self._open_paths():
            return
        self.file.value = path
        self.file.tooltip = str(path)
        if self._path_edit is not None:
            self._path_edit.setToolTip(str(path))
            self._path_edit.setCursorPosition(len(self._path_edit.text()))  # the name, not the folders

    def _open_paths(self) -> dict[Path, object]:
        """The files of the viewer's slide layers, to their layers."""
        return {
            Path(ly.metadata["slide"].path).resolve(): ly for ly in self.viewer.layers if is_slide_layer(ly)
        }

    # ------------------------------------------------------------------ actions
    def open_path(self, path: str | Path) -> None:
        """Open ``path`` into the viewer like the reader does (errors as notifications)."""
        path = Path(path)
        if not str(path) or path == Path("."):
            show_error("Pick a slide file first.")
            return
        already = self._open_paths().get(path.resolve())
        if already is not None:  # the field shows the open slide's file: Open shows that slide
            self.viewer.layers.selection.active = already
            self.refresh()
            return
        data = open_slide_layer(path)
        if data[0][0] is None:  # the error was shown already
            return
        pyramid, kwargs, _ = data[0]
        self._layer = self.viewer.add_image(pyramid, **kwargs)
        self.viewer.layers.selection.active = self._layer
        self.refresh()

    def set_mpp(self, value: str | float) -> None:
        """Give the current slide a pixel size (µm/px): re-scales its layer so it lines up in microns."""
        layer = self.slide_layer
        if layer is None:
            show_error("Open a slide first, then give its pixel size.")
            return
        try:
            mpp = validate_mpp(value)
        except SlideError as exc:
            show_error(str(exc))
            return
        slide: Slide = layer.metadata["slide"]
        slide.mpp = mpp
        layer.scale = (mpp, mpp)
        layer.units = ("µm", "µm")
        layer.metadata["mpp_missing"] = False
        self.viewer.reset_view()
        show_info(f"{slide.path.name}: pixel size set to {mpp:g} µm/px.")
        self.refresh()

    def show_masks(self):
        """Add the slide's tissue mask and the removed pen ink as label layers (in µm, over the slide).

        Returns the two layers, or None with a message (no slide, or no pixel size yet).
        """
        layer = self.slide_layer
        if layer is None:
            show_error("Open a slide first, then show its tissue mask.")
            return None
        slide: Slide = layer.metadata["slide"]
        if slide.mpp is None:
            show_error(f"{slide.path.name} has no pixel size: give its µm/px first.")
            return None
        try:
            masks = slide_masks(slide)
        except SlideError as exc:
            show_error(str(exc))
            return None
        translate = tuple((p - 1.0) / 2.0 * slide.mpp for p in masks.pixel_scale)  # pixel centres, in µm
        added = []
        for name, data, value in (("tissue mask", masks.tissue, 1), ("removed ink", masks.ink, 2)):
            full = f"{name} ({layer.name})"
            if full in self.viewer.layers:
                self.viewer.layers.remove(full)
            added.append(
                self.viewer.add_labels(
                    data.astype("uint8") * value,
                    name=full,
                    scale=masks.scale,
                    translate=translate,
                    opacity=0.35 if value == 1 else 0.6,
                )  # fmt: skip
            )
        tissue, ink = 100.0 * masks.tissue.mean(), 100.0 * masks.ink.mean()
        show_info(f"{slide.path.name}: tissue {tissue:.1f} % of the slide, pen ink removed {ink:.1f} %.")
        return added

    def _mask_clicked(self, *args) -> None:
        self.show_masks()

    def _open_clicked(self, *args) -> None:
        self.open_path(self.file.value)

    def _set_mpp_clicked(self, *args) -> None:
        self.set_mpp(self.mpp.value)
