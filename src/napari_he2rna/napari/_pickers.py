"""Pickers the dock widgets share: the slide-layer combo box that follows the active layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox

from ._state import get_registry, is_slide_layer

if TYPE_CHECKING:
    import napari


class SlideLayerPicker(ComboBox):
    """A combo box of the viewer's slide layers; follows the active layer (a slide or one of its heatmaps)."""

    def __init__(self, viewer: napari.viewer.Viewer, label: str = "slide") -> None:
        self._viewer = viewer
        super().__init__(label=label, choices=self._choices, nullable=False)
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved):
            ev.connect(self._reset)
        viewer.layers.selection.events.active.connect(self._follow_active)
        self._follow_active()

    def _choices(self, *_: Any) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self._viewer.layers if is_slide_layer(layer)]

    def _reset(self, *_: Any) -> None:
        self.reset_choices()

    def _follow_active(self, *_: Any) -> None:
        self.reset_choices()
        active = self._viewer.layers.selection.active
        if active is None:
            return
        if not is_slide_layer(active):
            state = get_registry(self._viewer).state_of_layer(active)
            active = state.layer if state is not None else None
        # ``==``, not ``is``: under ``he2rna view`` napari hands plugins a proxy of each layer, which is never
        # the layer object itself but compares equal to it
        match = next((c for c in self.choices if active is not None and c == active), None)
        if match is not None:
            self.value = match
