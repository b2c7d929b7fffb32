"""What the canvas itself says: the colour bar's label, the training-data warning, the maps' colormaps.

napari's colour bar shows ticks only; the label beside it (a canvas text overlay, :data:`LEGEND_OVERLAY`)
names the painted gene or set and its unit, and the slide prediction in the target's unit (see
:mod:`napari_he2rna.maps.map_style`). When the picked slide is outside the model's training data a red
text overlay (:data:`WARNING_OVERLAY`) says so over the map, which is drawn in grey. The maps' colormaps fade
their low end to transparent (:func:`styled_colormap`).
"""

from __future__ import annotations

import textwrap
import weakref
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from ..maps import map_style
from ._view_fit import canvas_overlays, keep_clear, track_view

if TYPE_CHECKING:
    import napari
    from napari.utils.colormaps import Colormap

#: Canvas overlay keys (``viewer.canvas.overlays[...]``).
LEGEND_OVERLAY = "he2rna_colorbar_label"
WARNING_OVERLAY = "he2rna_training_data_warning"
#: The texts of the top-right stack, top to bottom, which the view keeps clear of (:mod:`._view_fit`).
TEXT_OVERLAYS = (LEGEND_OVERLAY, WARNING_OVERLAY)
#: The canvas's warning when the slide is outside the model's training data.
WARNING_TEXT = "OUTSIDE THE MODEL'S TRAINING DATA:\nthese maps are not predictions"
#: Longest line of the canvas texts (characters); fewer on a narrow canvas (:func:`line_chars`).
LINE_CHARS = 48


@lru_cache(maxsize=64)
def _styled(base: str, fade: float, grey: bool, band: float | None) -> Colormap:
    from napari.utils.colormaps import AVAILABLE_COLORMAPS, Colormap

    rgba = np.asarray(AVAILABLE_COLORMAPS[base].map(np.linspace(0.0, 1.0, 256)), dtype=np.float64)
    colors = map_style.styled_colors(rgba, fade, grey=grey, band=band)
    name = map_style.colormap_name(base, fade, grey, band)
    return Colormap(colors=colors, controls=np.linspace(0.0, 1.0, len(colors)), name=name)


def styled_colormap(base: str, fade: float | None = None, grey: bool = False, band: float | None = None):
    """napari's ``base`` colormap with the maps' fade (:func:`map_style.heatmap_fade` by default), in grey
    for a slide outside the training data, with a white mark at ``band`` (0-1 of the colour range)."""
    fade = map_style.heatmap_fade() if fade is None else float(fade)
    return _styled(base, round(fade, 3), bool(grey), None if band is None else round(float(band), 2))


def line_chars(viewer: napari.viewer.Viewer, font_size: float) -> int:
    """How many characters of a canvas text fit a line: :data:`LINE_CHARS`, fewer on a narrow canvas (napari
    draws a character about ``font_size`` pixels wide)."""
    size = getattr(getattr(viewer, "canvas", None), "size", None)
    width = float(size[1]) if size is not None and len(size) == 2 else 800.0
    return int(min(max(0.9 * width / font_size, 12), LINE_CHARS))


def _wrapped(text: str, chars: int) -> str:
    # Empty lines at the end: napari measures a many-line text short (about a line in eight), and the
    # colour bar under the label would cover its last lines.
    lines = str(text).split("\n")
    text = "\n".join(
        textwrap.fill(x, chars, break_long_words=False, break_on_hyphens=False) or x for x in lines
    )
    return text + "\n" * (1 + text.count("\n") // 8)


#: The texts as given (before wrapping) per viewer, re-wrapped when the canvas is resized.
_GIVEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rewrap_on_resize(viewer: napari.viewer.Viewer) -> None:
    """Connect once per viewer: a resized canvas (a smaller window, a wider dock) re-wraps the texts."""
    canvas = getattr(viewer, "canvas", None)
    events = getattr(getattr(canvas, "events", None), "size", None)
    if events is None or viewer in _GIVEN:
        return
    _GIVEN[viewer] = {}

    def rewrap(*_) -> None:
        for key, (text, style) in list(_GIVEN.get(viewer, {}).items()):
            _set_text(viewer, key, text, **style)
        keep_clear(viewer, TEXT_OVERLAYS)

    events.connect(rewrap)


def _set_text(viewer: napari.viewer.Viewer, key: str, text: str | None, **style) -> None:
    from napari.components.overlays import TextOverlay

    _rewrap_on_resize(viewer)
    if viewer in _GIVEN:
        _GIVEN[viewer][key] = (text, style)
    overlays = canvas_overlays(viewer)
    overlay = overlays.get(key) if hasattr(overlays, "get") else None
    if not text:
        if overlay is not None and overlay.visible:
            overlay.visible = False
        return
    wrapped = _wrapped(text, line_chars(viewer, float(style.get("font_size", 10))))
    if overlay is None:
        overlays[key] = TextOverlay(text=wrapped, visible=True, **style)
        return
    if overlay.text != wrapped:
        overlay.text = wrapped
    if not overlay.visible:
        overlay.visible = True


def show_legend(viewer: napari.viewer.Viewer, text: str | None) -> None:
    """The colour bar's label (``None`` hides it), above the colour bar in the top right corner."""
    tiling = getattr(getattr(viewer, "canvas", None), "overlay_tiling", None)
    if tiling is not None and text and tiling.top_right != "vertical":
        tiling.top_right = "vertical"  # the label above the colour bar, not beside it
    _set_text(viewer, LEGEND_OVERLAY, text, position="top_right", font_size=9, box=True)
    keep_clear(viewer, TEXT_OVERLAYS)


def show_warning(viewer: napari.viewer.Viewer, outside: bool) -> None:
    """The red training-data warning over the canvas while ``outside``: in the top-right stack with the
    colour bar and its label, where the eye reads the map's scale (at the bottom a napari notification
    covered it, and on a narrow canvas its wrapped lines ran off the bottom edge)."""
    tiling = getattr(getattr(viewer, "canvas", None), "overlay_tiling", None)
    if tiling is not None and outside and tiling.top_right != "vertical":
        tiling.top_right = "vertical"
    _set_text(
        viewer,
        WARNING_OVERLAY,
        WARNING_TEXT if outside else None,
        position="top_right",
        font_size=11,
        color="#ff4040",
        box=True,
    )
    keep_clear(viewer, TEXT_OVERLAYS)


def watch_view(viewer: napari.viewer.Viewer) -> None:
    """Start following the user's zooms and pans (call when the plugin's dock is made): until they move the
    view, it is kept clear of the canvas texts (:mod:`._view_fit`)."""
    track_view(viewer, TEXT_OVERLAYS)


def canvas_text(viewer: napari.viewer.Viewer, key: str) -> str:
    """The text a canvas overlay shows now (``""`` when hidden or absent)."""
    overlay = canvas_overlays(viewer).get(key)
    return str(overlay.text).strip() if overlay is not None and overlay.visible else ""
