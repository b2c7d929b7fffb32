"""Keep the slide clear of the canvas's own texts: fit the view into what the label, the warning and the
colour bar leave free.

The colour bar's label, the red training-data warning and the colour bar stack in the canvas's top-right
corner (:mod:`._canvas_notes`). On a wide canvas they sit beside the slide; on napari's first-launch window
(a canvas of about 350 x 580 px beside the docks) napari's own fit puts the slide under them, and a
pathologist sees the top strip of the map through text. Here the view is fitted, as napari's Home does, but
into the part of the canvas below the texts (and left of the colour bar, or below it when that is larger):

* when a text appears, changes or goes (then the whole canvas is free again), and when the canvas is
  resized, **unless the user has zoomed or panned since the last fit** (napari's own on the first layer or
  Home, or ours): they keep their view;
* right after napari's Home (``reset_view``).

napari does not expose the drawn size of a text overlay, so the stack's size is estimated from its lines
and font size (:data:`LINE_PX_PER_PT`, measured on screenshots under Xvfb at 96 dpi; checked at a device pixel
ratio of 2 too, ``QT_SCALE_FACTOR=2``, where canvas texts and sizes scale together) and napari's colour bar
size. No Qt import: it works on napari's models (viewer, camera, overlays).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import napari

#: Canvas pixels per line of a text overlay, per point of its font size (21 px a line at 9 pt, 26 at 11 pt
#: in the viewer tour's screenshots).
LINE_PX_PER_PT = 2.35
#: Padding around a text box and between the stacked overlays (px).
PAD_PX = 10.0
#: Width of napari's colour bar with its tick labels, and its height with padding (px; 25 x 150 bar).
COLORBAR_PX = (75.0, 170.0)
#: Blank margin around the slide, as a fraction of the free area (napari's Home uses 5 % of the canvas).
MARGIN = 0.05

# Per viewer: has the user zoomed or panned since the last fit (napari's Home or ours)?
_TOUCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FITTING: set[int] = set()  # ids of the viewers whose camera this module is moving now


def canvas_overlays(viewer: napari.viewer.Viewer):
    """The canvas overlays by key (``viewer.canvas.overlays``; an older napari's ``viewer._overlays``)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.overlays if canvas is not None and hasattr(canvas, "overlays") else viewer._overlays


def camera(viewer: napari.viewer.Viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def canvas_size(viewer: napari.viewer.Viewer) -> tuple[float, float] | None:
    """The canvas's (height, width) in pixels, or None without a canvas."""
    size = getattr(getattr(viewer, "canvas", None), "size", None)
    if size is None or len(size) != 2 or min(size) <= 0:
        return None
    return float(size[0]), float(size[1])


def overlay_footprint(viewer: napari.viewer.Viewer, keys) -> tuple[float, float, float]:
    """``(top, right, bar_bottom)``: how far down the visible text overlays ``keys`` reach, how wide the
    colour bar under them is (0 without one) and how far down it reaches (px from the canvas's top)."""
    overlays = canvas_overlays(viewer)
    top = 0.0
    for key in keys:
        ov = overlays.get(key) if hasattr(overlays, "get") else None
        if ov is None or not ov.visible or not str(ov.text).strip():
            continue
        n_lines = str(ov.text).rstrip("\n").count("\n") + 1
        top += n_lines * LINE_PX_PER_PT * float(ov.font_size) + PAD_PX
    bar = any(
        getattr(getattr(layer, "colorbar", None), "visible", False) and layer.visible
        for layer in viewer.layers
    )
    right, bar_h = COLORBAR_PX if bar else (0.0, 0.0)
    return (top + PAD_PX if top else 0.0), right, top + bar_h


def fit_clear(viewer: napari.viewer.Viewer, keys) -> bool:
    """Fit the layers' extent into the canvas area the overlays ``keys`` and the colour bar leave free.

    With nothing shown it is napari's Home over the visible layers (so a view fitted under the texts goes back
    when they go). Returns False (view unchanged) in 3D, in grid mode, or without visible layers or a
    canvas."""
    size = canvas_size(viewer)
    if size is None or len(viewer.layers) == 0 or viewer.dims.ndisplay != 2 or viewer.grid.enabled:
        return False
    top, right, bar_bottom = overlay_footprint(viewer, keys)
    h, w = size
    shown = [np.asarray(layer.extent.world, dtype=float)[:, -2:] for layer in viewer.layers if layer.visible]
    if not shown:
        return False
    y0, x0 = np.min([e[0] for e in shown], axis=0)  # the visible layers' extent (napari's Home: all layers)
    y1, x1 = np.max([e[1] for e in shown], axis=0)
    dy, dx = max(y1 - y0, 1e-9), max(x1 - x0, 1e-9)
    # Left of the colour bar and below the texts, or below both: whichever shows the slide larger.
    areas = [(0.0, w - right, top, h), (0.0, w, bar_bottom, h)]
    best = None
    for left, rgt, upper, lower in areas:
        aw, ah = rgt - left, lower - upper
        if aw <= 20 or ah <= 20:
            continue
        zoom = (1.0 - MARGIN) * min(aw / dx, ah / dy)
        if best is None or zoom > best[0]:
            best = (zoom, (left + rgt) / 2.0, (upper + lower) / 2.0)
    if best is None:
        return False
    zoom, cx_px, cy_px = best
    center = list(camera(viewer).center)
    center[-1] = (x0 + x1) / 2.0 - (cx_px - w / 2.0) / zoom
    center[-2] = (y0 + y1) / 2.0 - (cy_px - h / 2.0) / zoom
    _FITTING.add(id(viewer))
    try:
        camera(viewer).zoom = zoom
        camera(viewer).center = tuple(center)
    finally:
        _FITTING.discard(id(viewer))
    return True


def track_view(viewer: napari.viewer.Viewer, keys) -> None:
    """Watch ``viewer``'s camera (once per viewer): a zoom or pan by the user marks the view as theirs until
    napari's Home, which is followed by a fit clear of the overlays ``keys``."""
    if viewer in _TOUCHED:
        return
    _TOUCHED[viewer] = False
    ref = weakref.ref(viewer)

    def moved(event=None) -> None:
        v = ref()
        if v is not None and id(v) not in _FITTING:
            _TOUCHED[v] = True

    def after_home(event=None) -> None:  # napari's fit_to_view moves the camera, then emits reset_view
        v = ref()
        if v is None:
            return
        _TOUCHED[v] = False
        fit_clear(v, keys)

    camera(viewer).events.zoom.connect(moved)
    camera(viewer).events.center.connect(moved)
    viewer.events.reset_view.connect(after_home)


def keep_clear(viewer: napari.viewer.Viewer, keys) -> None:
    """Refit clear of the overlays ``keys`` unless the user has zoomed or panned since the last fit."""
    track_view(viewer, keys)
    if not _TOUCHED.get(viewer, False):
        fit_clear(viewer, keys)
