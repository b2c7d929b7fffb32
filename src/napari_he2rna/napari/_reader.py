"""npe2 reader: a whole-slide image becomes one lazy, multiscale RGB image layer scaled in µm.

The layer's ``metadata["slide"]`` is the open :class:`~napari_he2rna.slides.slide.Slide` (the widgets use it
to tile,
extract features, ...). Its file handle is closed when the last layer showing it is removed from the viewer
that opened it (see :func:`watch_layer_removal`); a layer built without a current viewer (e.g. a script
calling the reader directly) keeps its handle until the Slide object is garbage collected.

Bad files never raise into napari: the user gets one sentence as a notification and the viewer carries on.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error, show_warning

from ..errors import SlideError
from ..slides.slide import IMAGE_SUFFIXES, SLIDE_SUFFIXES, TIFF_SUFFIXES, Slide, open_slide

LayerData = tuple[Any, dict[str, Any], str]
# napari's "opened without layers" sentinel: the reader took the file (and told the user what was wrong),
# so napari must neither try other readers nor raise.
NO_LAYERS: list[tuple[None]] = [(None,)]
_watched_viewers: weakref.WeakSet = weakref.WeakSet()


def slide_layer_data(slide: Slide, name: str | None = None) -> LayerData:
    """The ``(data, kwargs, "image")`` tuple napari needs to show ``slide``.

    Multiscale when the pyramid has more than one level; ``scale`` is the pixel size in µm, or 1 (pixels,
    with ``metadata["mpp_missing"] = True``) when the slide does not say it.
    """
    pyramid = slide.pyramid()
    mpp = slide.mpp
    scale = (mpp, mpp) if mpp is not None else (1.0, 1.0)
    kwargs: dict[str, Any] = {
        "name": name or slide.path.name,
        "multiscale": len(pyramid) > 1,
        "rgb": True,
        "contrast_limits": (0, 255),  # uint8 RGB: spares napari a min/max scan of the pyramid
        "scale": scale,
        "units": ("µm", "µm") if mpp is not None else ("pixel", "pixel"),
        "metadata": {
            "slide": slide,
            "slide_path": str(slide.path),
            "mpp_missing": mpp is None,
            "pyramid_downsamples": slide.pyramid_downsamples,
        },
    }
    data = pyramid if len(pyramid) > 1 else pyramid[0]
    return data, kwargs, "image"


def open_slide_layer(path: str | Path, mpp: float | None = None) -> list[LayerData] | list[tuple[None]]:
    """Open ``path`` as layer data, reporting problems as napari notifications instead of raising.

    Returns
    -------
    list
        One layer data tuple, or napari's empty sentinel ``[(None,)]`` after an error notification.
    """
    try:
        slide = open_slide(path, mpp=mpp)
    except SlideError as exc:
        show_error(str(exc))
        return NO_LAYERS
    _warn_if_no_mpp(slide)
    watch_layer_removal()
    return [slide_layer_data(slide)]


def _warn_if_no_mpp(slide: Slide) -> None:
    if slide.mpp is None:
        show_warning(
            f"{slide.path.name} does not say its pixel size, so it is shown in pixels: "
            "enter its µm/px in the Slide widget (Plugins > HE2RNA > Slide)."
        )


def get_reader(path: str | list[str]) -> Callable[..., list] | None:
    """npe2 ``get_reader``: a reader function for slide files, None for anything else (napari tries others).

    Files with a whole-slide suffix (.svs, .ndpi, ...) are always taken, so a broken one gets this plugin's
    explanation; plain .tif/.png/.jpg files are only taken when they open, so other readers get the rest.
    """
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SLIDE_SUFFIXES or path.is_dir():
        return None
    if suffix in TIFF_SUFFIXES + IMAGE_SUFFIXES:
        try:
            slide = open_slide(path)
        except SlideError:
            return None
        # hand the slide already opened to the reader instead of opening the file twice
        return partial(_read, opened=slide)
    return _read


def _read(path: str | list[str], opened: Slide | None = None) -> list:
    if isinstance(path, list | tuple):
        path = path[0]
    if opened is not None and not opened.closed:
        _warn_if_no_mpp(opened)
        watch_layer_removal()
        return [slide_layer_data(opened)]
    return open_slide_layer(path)


def _slides_shown(layers) -> set[int]:
    return {
        id(layer.metadata.get("slide")) for layer in layers if isinstance(layer.metadata.get("slide"), Slide)
    }


def _close_removed_slide(event) -> None:
    slide = event.value.metadata.get("slide") if hasattr(event.value, "metadata") else None
    if isinstance(slide, Slide) and id(slide) not in _slides_shown(event.source):
        slide.close()


def watch_layer_removal(viewer=None) -> None:
    """Close a slide's handle when the last layer showing it leaves ``viewer`` (default: the current one)."""
    if viewer is None:
        if "napari._qt.qt_main_window" not in sys.modules:
            return  # no Qt viewer exists (script or headless use); asking napari would import all of Qt
        from napari import current_viewer

        viewer = current_viewer()
    if viewer is None or viewer in _watched_viewers:
        return
    viewer.layers.events.removed.connect(_close_removed_slide)
    _watched_viewers.add(viewer)
