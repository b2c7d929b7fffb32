"""The Model dock's layers: a slide's tile outline, its heatmap and fold-spread layers, pinned copies.

One heatmap layer per slide (``role: "active"``): picking another gene updates its data in place; **Pin**
keeps a copy (``role: "pinned"``). The fold spread is a second active layer (``kind: "uncertainty"``).
Every layer carries ``metadata["he2rna"]`` (:mod:`._state`); hovering one shows the tile's readout
(:class:`HeatmapImage`, :meth:`HeatmapLayers.hover_text`). What a layer shows comes from
:func:`napari_he2rna.maps.map_display.map_view` (the percentile within the slide, clipped to the slide and
its tissue, low values fading out); nothing here computes scores. The colour bar shown is the active
layer's, with its label on the canvas (:mod:`._canvas_notes`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image
from napari.utils.notifications import show_error

from ..errors import He2rnaError
from ..maps import gene_sets, heatmaps, map_display, map_style, readout
from ..maps.gene_sets import DISTANCE_NAME
from ..maps.map_display import MapView
from ._canvas_notes import show_legend, show_warning, styled_colormap, watch_view
from ._state import META_KEY, SessionRegistry, SlideState, layer_info

if TYPE_CHECKING:
    import napari

    from ..slides.tiling import TileGrid

#: Opacity of a new map layer (napari's layer controls change it); the low values fade out on their own.
HEATMAP_OPACITY = 0.75


def tile_outline(grid: TileGrid, max_px: int = 2048) -> tuple[np.ndarray, tuple, tuple]:
    """A raster drawing each kept tile's square outline, with its napari scale/translate in µm.

    Each tile becomes ``f x f`` pixels (``f`` from 3 to 16 so the raster stays under ``max_px`` a side) whose
    border is 1 and inside NaN (transparent), so the slide shows through. The tiles of the last row and column
    stop at the slide's edge (:func:`napari_he2rna.maps.heatmaps.inside_slide`), where their border is drawn.

    Returns
    -------
    raster : (n_rows * f, n_cols * f) float32
    scale, translate : (y, x) µm; pixel ``j`` covers level-0 ``[j*T/f, (j+1)*T/f)``, as in the maps
        (:func:`napari_he2rna.maps.heatmaps.display_transform`).
    """
    n_rows, n_cols = int(grid.n_rows), int(grid.n_cols)
    f = int(np.clip(max_px // max(n_rows, n_cols, 1), 3, 16))
    kept = np.zeros((n_rows, n_cols), dtype=bool)
    kept[grid.table["row"].to_numpy(dtype=np.intp), grid.table["col"].to_numpy(dtype=np.intp)] = True
    block = np.zeros((f, f), dtype=bool)
    block[[0, -1], :] = True
    block[:, [0, -1]] = True
    border = np.kron(kept, block)
    inside = heatmaps.inside_slide(grid, f)
    cover = np.kron(kept, np.ones((f, f), dtype=bool)) & inside
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if rows.size and cols.size:  # partial tiles: their border at the slide's edge
        border[rows[-1], :] |= cover[rows[-1], :]
        border[:, cols[-1]] |= cover[:, cols[-1]]
    raster = np.where(border & inside, np.float32(1.0), np.float32(np.nan))
    scale, translate = heatmaps.display_transform(grid, f)
    return raster, scale, translate


class HeatmapImage(Image):
    """A heatmap Image layer whose status-bar text is the tile's readout (scores of every painted name and
    the truth value), from ``readout_provider(world_position) -> str`` (see ``HeatmapLayers.hover_text``)."""

    readout_provider = None

    def get_status(self, position=None, *, view_direction=None, dims_displayed=None, world=False, value=None):
        status = super().get_status(
            position, view_direction=view_direction, dims_displayed=dims_displayed, world=world, value=value
        )
        provider = self.readout_provider
        if provider is not None and position is not None:
            try:
                pos = np.asarray(position, dtype=float)
                if not world:
                    pos = np.asarray(self.data_to_world(pos), dtype=float)
                text = provider(pos)
            except Exception:  # noqa: BLE001 - a readout must never break the status bar
                text = ""
            if text:
                status["value"] = text
        return status


class HeatmapLayers:
    """Adds, finds and updates the layers the Model dock draws for each slide.

    Parameters
    ----------
    viewer
        The viewer the layers go to.
    registry
        The viewer's session registry (which layers belong to which slide).
    cancer_type
        ``() -> str | None``: the cancer type whose validation R the layer names show (the gene picker's).
    """

    def __init__(
        self,
        viewer: napari.viewer.Viewer,
        registry: SessionRegistry,
        cancer_type: Callable[[], str | None],
    ) -> None:
        self.viewer = viewer
        self.registry = registry
        self._cancer_type = cancer_type
        self._outside = False  # the picked slide is outside the training data: the canvas says so
        # The colour bar (and its label) follow the active layer: the fold spread has its own.
        viewer.layers.selection.events.active.connect(self._active_changed)
        viewer.layers.events.removed.connect(self._layers_removed)
        watch_view(viewer)  # the view keeps clear of the canvas texts until the user zooms or pans
        canvas = getattr(viewer, "canvas", None)
        if canvas is not None and hasattr(getattr(canvas, "events", None), "size"):
            canvas.events.size.connect(self._canvas_resized)  # the canvas texts wrap to its width

    # ------------------------------------------------------------------ tile outline
    def show_tiles(self, state: SlideState, grid: TileGrid) -> None:
        """Add or update the light tile-outline layer of a slide."""
        raster, scale, translate = tile_outline(grid)
        existing = self.registry.layers_of(state, "tiles")
        if existing:
            layer = existing[0]
            layer.data = raster
            layer.scale, layer.translate = scale, translate
            return
        self.viewer.add_image(
            raster,
            name=f"tissue tiles ({state.layer.name})",
            colormap="cyan",
            contrast_limits=(0.0, 1.0),
            opacity=0.3,
            blending="translucent",
            scale=scale,
            translate=translate,
            units=("µm", "µm"),
            metadata={META_KEY: {"kind": "tiles", "session_key": state.key, "name": "tiles"}},
        )
        self.viewer.layers.selection.active = state.layer  # keep the picker on the slide

    def remove_tiles_if_not_ready(self, state: SlideState) -> None:
        if state.session.ready:
            return  # an earlier run's grid is still valid
        for layer in self.registry.layers_of(state, "tiles"):
            self.viewer.layers.remove(layer)

    # ------------------------------------------------------------------ heatmap layers
    def active_layer(self, state: SlideState, kind: str = "heatmap"):
        """The slide's one active layer of ``kind`` (``"heatmap"`` or ``"uncertainty"``), or None."""
        for layer in self.registry.layers_of(state, kind):
            if (layer_info(layer) or {}).get("role") == "active":
                return layer
        return None

    def heatmap_layer(self, state: SlideState, name: str):
        """The heatmap layer showing ``name`` for a slide (the active one first, then pinned), or None."""
        found = [ly for ly in self.registry.layers_of(state, "heatmap") if layer_info(ly).get("name") == name]
        found.sort(key=lambda ly: (layer_info(ly) or {}).get("role") != "active")
        return found[0] if found else None

    def layer_title(
        self, state: SlideState, name: str, kind: str = "heatmap", counts: tuple[int, int] | None = None
    ) -> str:
        """A layer's name: the gene, its validation R (when the bundle has one) and, while running, the share
        of tiles painted (``counts``: (done, total), default the session's now)."""
        session = state.session
        caption = readout.r_caption(session.bundle, name, self._cancer_type())
        title = name if kind == "heatmap" else f"{name} fold spread"
        if caption:
            title += f" · {caption}"
        done, total = counts if counts is not None else session.n_scored()
        if not session.ready and total:
            title += f" · {readout.percent_done(done, total)}% of tiles"
        return title

    def map_content(self, state: SlideState, name: str, kind: str = "heatmap") -> tuple[MapView, list]:
        """What the layer of ``name`` shows (:func:`map_display.map_view`) and the partial-set warnings."""
        session = state.session
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", gene_sets.PartialGeneSetWarning)
            view = map_display.map_view(session, name, kind, self.tissue_cover(state))
        return view, list(seen)

    def layer_content(self, state: SlideState, name: str, kind: str):
        """``(raster, limits, scale, translate, units, warnings)`` of :meth:`map_content`."""
        view, seen = self.map_content(state, name, kind)
        return view.raster, view.limits, view.scale, view.translate, view.units, seen

    @staticmethod
    def tissue_cover(state: SlideState):
        """The tissue pixels of the slide's maps when the run computed them for the current grid or None."""
        entry = state.extra.get("tissue_cover")
        session = state.session
        if not entry or not session.painted:
            return None
        grid, cover = entry
        return cover if grid is session.current_grid() else None

    def update_layer(
        self,
        state: SlideState,
        layer,
        name: str,
        kind: str = "heatmap",
        view: MapView | None = None,
        counts: tuple[int, int] | None = None,
    ) -> bool:
        """Put ``name``'s current map into an existing layer (in place). False after an error message."""
        if view is None:
            try:
                view, _ = self.map_content(state, name, kind)
            except He2rnaError as exc:
                show_error(str(exc))
                return False
        raster, limits = view.raster, view.limits
        if layer.data.shape == raster.shape:
            layer.data[...] = raster
            layer.refresh()
        else:
            layer.data = raster
        colormap = styled_colormap(view.colormap, grey=view.outside, band=view.band)
        if layer.colormap.name != colormap.name:
            layer.colormap = colormap
        # Each contrast-limits event redraws the colour bar (~7 ms): the range change stays silent and the
        # limits' own event redraws once.
        with layer.events.contrast_limits.blocker():
            layer.contrast_limits_range = limits
        layer.contrast_limits = limits
        if tuple(layer.scale) != tuple(view.scale) or tuple(layer.translate) != tuple(view.translate):
            layer.scale, layer.translate = view.scale, view.translate
        info = layer_info(layer)
        if info.get("role") == "active":
            old, info["name"] = info.get("name"), name
            if kind == "heatmap" and old and old != name and self.heatmap_layer(state, old) is None:
                state.session.drop(old)  # as when its layer is closed: no layer shows it any more
            layer.metadata["units"] = view.units
            layer.metadata["legend"] = view.legend
            title = self.layer_title(state, name, kind, counts)
            if layer.name != title:
                layer.name = title
            self.refresh_legend()
        return True

    def add_layer(
        self,
        state: SlideState,
        name: str,
        kind: str,
        role: str,
        raster,
        limits,
        scale,
        translate,
        units,
        title: str,
        *,
        colormap=None,
        legend: str = "",
    ):
        """Add a map layer (``colormap``: a napari colormap, default the fading one of ``kind``)."""
        if colormap is None:
            base = map_style.SCORE_COLORMAP if kind == "heatmap" else map_style.SPREAD_COLORMAP
            colormap = styled_colormap(base)
        layer = HeatmapImage(
            raster,
            name=title,
            colormap=colormap,
            contrast_limits=limits,
            opacity=HEATMAP_OPACITY,
            blending="translucent",
            interpolation2d="nearest",
            scale=scale,
            translate=translate,
            units=("µm", "µm"),
            metadata={
                META_KEY: {"kind": kind, "session_key": state.key, "name": name, "role": role},
                "units": units,
                "legend": legend,
            },
        )
        layer.readout_provider = lambda pos, st=state: self.hover_text(st, pos)
        layer.events.visible.connect(lambda *_: self.refresh_legend())
        self.viewer.add_layer(layer)
        return layer

    def add_view(self, state: SlideState, view: MapView, role: str, title: str):
        """Add the layer of a :class:`MapView` (its colormap, limits, placement and legend)."""
        return self.add_layer(
            state,
            view.name,
            view.kind,
            role,
            view.raster,
            view.limits,
            view.scale,
            view.translate,
            view.units,
            title,
            colormap=styled_colormap(view.colormap, grey=view.outside, band=view.band),
            legend=view.legend,
        )

    def paint_spread(self, state: SlideState, name: str):
        """Add or update the slide's uncertainty layer (std of the fold models' tile scores) for ``name``."""
        if state.session.bundle is None or name == DISTANCE_NAME:
            return None
        layer = self.active_layer(state, "uncertainty")
        if layer is not None:
            return layer if self.update_layer(state, layer, name, "uncertainty") else None
        try:
            view, _ = self.map_content(state, name, "uncertainty")
        except He2rnaError as exc:
            show_error(str(exc))
            return None
        layer = self.add_view(state, view, "active", self.layer_title(state, name, "uncertainty"))
        layer.visible = True
        self.show_colorbar(layer)  # its own (viridis) colour bar; selecting a layer shows that layer's
        return layer

    def pin(self, state: SlideState | None):
        """Keep a copy of the slide's active heatmap as its own layer; returns it (None with a message)."""
        layer = self.active_layer(state) if state is not None else None
        if layer is None:
            show_error("Paint a gene first; Pin keeps a copy of its heatmap.")
            return None
        info = layer_info(layer)
        name = info["name"]
        units = layer.metadata.get("units", "")
        copy = self.add_layer(
            state,
            name,
            "heatmap",
            "pinned",
            np.array(layer.data, copy=True),
            tuple(layer.contrast_limits),
            tuple(layer.scale),
            tuple(layer.translate),
            units,
            f"{name} (pinned)",
            colormap=layer.colormap,
            legend=layer.metadata.get("legend", ""),
        )
        copy.visible = True
        copy.colorbar.visible = False
        self.viewer.layers.selection.active = layer
        self.registry.changed.emit()
        return copy

    def hover_text(self, state: SlideState, world_pos) -> str:
        """Status-bar text for a point (world µm, (..., y, x)): the tile's scores of every painted name (the
        slide's heatmap layers) and the Compare tab's truth value for it."""
        session = state.session
        if state.freed or not session.painted:
            return ""
        y, x = float(world_pos[-2]), float(world_pos[-1])
        tile = session.tile_at(x, y)
        if tile is None:
            return ""
        names = []
        for layer in self.registry.layers_of(state, "heatmap"):
            n = (layer_info(layer) or {}).get("name")
            if n and n not in names:
                names.append(n)
        scores = {n: session.scores(n) for n in names}
        truth_info = state.extra.get("truth")
        grid = session.current_grid()
        tile_id = grid.table["tile_id"].iloc[tile] if "tile_id" in grid.table else tile
        unit = session.units(names[0]) if names else ""
        return readout.hover_text(tile, scores, unit, truth_info, tile_id=tile_id)

    def show_colorbar(self, layer) -> None:
        """Show ``layer``'s colour bar and its label on the canvas; hide the other maps' (they would
        overlap)."""
        for other in self.viewer.layers:
            info = layer_info(other)
            if info and info.get("kind") in ("heatmap", "uncertainty") and other is not layer:
                if hasattr(other, "colorbar") and other.colorbar.visible:
                    other.colorbar.visible = False
        if hasattr(layer, "colorbar") and not layer.colorbar.visible:
            layer.colorbar.visible = True
        self.refresh_legend()

    def refresh_legend(self) -> None:
        """Show the label of the colour bar on the canvas (of the visible map whose colour bar is on)."""
        text = None
        for layer in self.viewer.layers:
            info = layer_info(layer)
            if not info or info.get("kind") not in ("heatmap", "uncertainty"):
                continue
            if layer.visible and getattr(getattr(layer, "colorbar", None), "visible", False):
                text = layer.metadata.get("legend") or None
        show_legend(self.viewer, text)

    def show_training_warning(self, outside: bool) -> None:
        """The canvas's red warning while the picked slide is outside the model's training data."""
        self._outside = bool(outside)
        show_warning(self.viewer, self._outside)

    def _canvas_resized(self, event=None) -> None:
        self.refresh_legend()
        show_warning(self.viewer, self._outside)

    def _active_changed(self, event=None) -> None:
        layer = self.viewer.layers.selection.active
        info = layer_info(layer) if layer is not None else None
        if info and info.get("kind") in ("heatmap", "uncertainty"):
            self.show_colorbar(layer)

    def _layers_removed(self, event=None) -> None:
        self.refresh_legend()

    def refresh_live(self, state: SlideState, counts: tuple[int, int] | None = None) -> None:
        """Repaint a slide's heatmap layers from the tiles extracted so far (the data is updated in place);
        ``counts`` (done, total) is what the layer names say."""
        for layer in [
            *self.registry.layers_of(state, "heatmap"),
            *self.registry.layers_of(state, "uncertainty"),
        ]:
            info = layer_info(layer) or {}
            name = info.get("name")
            if name:
                self.update_layer(state, layer, name, info.get("kind", "heatmap"), counts=counts)
