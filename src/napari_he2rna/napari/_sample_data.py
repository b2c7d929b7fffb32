"""napari sample data: the bundled synthetic H&E slide, opened like any slide."""

from __future__ import annotations

from ..errors import SlideError
from ..settings import sample_data_dir
from ..slides.slide import open_slide
from ._reader import slide_layer_data, watch_layer_removal

SAMPLE_SLIDE_NAME = "sample_slide.tiff"


def sample_slide() -> list:
    """The sample slide as layer data; a clear :class:`SlideError` when it has not been made yet."""
    path = sample_data_dir() / SAMPLE_SLIDE_NAME
    if not path.is_file():
        raise SlideError(f"The sample slide {path} is not there; make it with `he2rna make-sample`.")
    slide = open_slide(path)
    watch_layer_removal()
    return [slide_layer_data(slide, name="sample slide")]
