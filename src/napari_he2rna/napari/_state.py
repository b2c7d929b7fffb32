"""The viewer-side state the HE2RNA dock widgets share: one :class:`SlideSession` per open slide layer.

The Model widget creates a slide's session when it first works on it; the Export widget reads it. The user's
gene sets live here too (:attr:`SessionRegistry.gene_sets`), so every session scores the same sets. A session
lives as long as its slide layer: removing the slide layer cancels a run in flight, removes the slide's
heatmap and tile-outline layers and frees the features and scores (the slide handle itself is closed by the
reader's own removal hook). Removing one heatmap layer drops that name's cached tile scores.

Layers made here carry ``metadata["he2rna"]``: ``{"kind": "heatmap" | "tiles", "session_key": int,
"name": str}``; a session is keyed by ``id()`` of its slide layer (layers are not guaranteed hashable).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psygnal import Signal

from ..maps.session import SlideSession
from ..slides.slide import Slide

if TYPE_CHECKING:
    import napari

META_KEY = "he2rna"
_registries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_slide_layer(layer: Any) -> bool:
    """True for a layer showing a slide opened by this plugin (its ``metadata["slide"]`` is a Slide)."""
    return isinstance(getattr(layer, "metadata", {}).get("slide"), Slide)


def layer_info(layer: Any) -> dict | None:
    """The ``metadata["he2rna"]`` of a heatmap / tiles layer made by the widgets, else None."""
    info = getattr(layer, "metadata", {}).get(META_KEY)
    return info if isinstance(info, dict) else None


@dataclass
class SlideState:
    """What the widgets keep for one slide layer."""

    layer: Any
    session: SlideSession
    cancel: threading.Event | None = None  # set while a run is in flight
    running: bool = False
    freed: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> int:
        return id(self.layer)


class SessionRegistry:
    """One :class:`SlideState` (holding a :class:`SlideSession`) per slide layer of one viewer.

    Use :func:`get_registry` to get the viewer's registry. ``changed`` is emitted (no arguments) whenever a
    session is created or freed or a heatmap is painted or removed, so widgets can refresh their lists.
    """

    changed = Signal()

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer_ref = weakref.ref(viewer)
        self._states: dict[int, SlideState] = {}
        #: The user's gene sets (name -> genes), shared by every slide's session, present and future.
        self.gene_sets: dict[str, list[str]] = {}
        viewer.layers.events.removed.connect(self._layer_removed)

    @property
    def viewer(self):
        return self._viewer_ref()

    # ------------------------------------------------------------------ lookup
    def slide_layers(self) -> list:
        """The viewer's slide layers, in layer-list order."""
        viewer = self.viewer
        return [] if viewer is None else [ly for ly in viewer.layers if is_slide_layer(ly)]

    def get(self, layer: Any) -> SlideState | None:
        """The state of a slide layer, or None if no session was made for it yet."""
        return self._states.get(id(layer)) if layer is not None else None

    def by_key(self, key: int) -> SlideState | None:
        return self._states.get(key)

    def state_for(self, layer: Any) -> SlideState:
        """The state of a slide layer, created (with a model-less session) on first use."""
        if not is_slide_layer(layer):
            raise ValueError(f"{getattr(layer, 'name', layer)!r} is not a slide layer")
        state = self._states.get(id(layer))
        if state is None or state.layer is not layer:
            state = SlideState(layer=layer, session=SlideSession(layer.metadata["slide"]))
            if self.gene_sets:
                state.session.add_gene_sets(self.gene_sets)
            self._states[id(layer)] = state
            self.changed.emit()
        return state

    def states(self) -> list[SlideState]:
        return list(self._states.values())

    def add_gene_sets(self, sets: dict[str, list[str]]) -> None:
        """Add (or redefine) user gene sets: every slide's session gets them, and so will new ones."""
        self.gene_sets.update({name: list(genes) for name, genes in sets.items()})
        for state in self._states.values():
            state.session.add_gene_sets(sets)
        self.changed.emit()

    def layers_of(self, state: SlideState, kind: str | None = None) -> list:
        """The heatmap (``kind="heatmap"``) and/or tile-outline (``"tiles"``) layers made for a slide."""
        viewer = self.viewer
        if viewer is None:
            return []
        out = []
        for ly in viewer.layers:
            info = layer_info(ly)
            if info and info.get("session_key") == state.key and (kind is None or info.get("kind") == kind):
                out.append(ly)
        return out

    def state_of_layer(self, layer: Any) -> SlideState | None:
        """The state a layer belongs to: a slide layer's own, or the slide of a heatmap / tiles layer."""
        if layer is None:
            return None
        if is_slide_layer(layer):
            return self.get(layer)
        info = layer_info(layer)
        return self._states.get(info["session_key"]) if info else None

    # ------------------------------------------------------------------ lifetime
    def free(self, state: SlideState) -> None:
        """Forget a slide: cancel its run, remove its heatmap/tile layers, free features and scores."""
        if self._states.get(state.key) is state:
            del self._states[state.key]
        state.freed = True
        if state.cancel is not None:
            state.cancel.set()
        viewer = self.viewer
        if viewer is not None:
            for ly in self.layers_of(state):
                if ly in viewer.layers:
                    viewer.layers.remove(ly)
        if not state.running:  # a running worker frees the session when it ends (see release_after_run)
            self._close_session(state)
        self.changed.emit()

    def release_after_run(self, state: SlideState) -> None:
        """Called by the Model widget when a run ends: frees the session if its layer went meanwhile."""
        state.running = False
        state.cancel = None
        if state.freed:
            self._close_session(state)

    def _close_session(self, state: SlideState) -> None:
        session = state.session
        others = [ly for ly in self.slide_layers() if ly.metadata.get("slide") is session.slide]
        if others:  # the same Slide is still shown by another layer: free memory, keep the handle
            session.release()
        else:
            session.close()

    def _layer_removed(self, event) -> None:
        layer = event.value
        if is_slide_layer(layer):
            state = self._states.get(id(layer))
            if state is not None and state.layer is layer:
                self.free(state)
            return
        info = layer_info(layer)
        if not info:
            return
        state = self._states.get(info.get("session_key"))
        if state is None:
            return
        if info.get("kind") == "heatmap":
            name = info.get("name")
            still_shown = [
                ly for ly in self.layers_of(state, "heatmap") if layer_info(ly).get("name") == name
            ]
            if name and not still_shown:
                state.session.drop(name)
        self.changed.emit()


def get_registry(viewer: napari.viewer.Viewer) -> SessionRegistry:
    """The viewer's :class:`SessionRegistry` (made on first use; both dock widgets share it)."""
    registry = _registries.get(viewer)
    if registry is None:
        registry = SessionRegistry(viewer)
        _registries[viewer] = registry
    return registry
