"""napari-he2rna: predict gene expression from H&E whole-slide images and paint it onto the slide.

The public Python API (see ``docs/api.md``); each name is imported on first use, so ``import
napari_he2rna`` loads no torch, Qt or napari:

- :func:`open_slide` — a whole-slide image as a lazy, micron-true pyramid (``slides``).
- :func:`tile_grid` — the tissue tiles of a slide (``slides``).
- :func:`extract_features` — backbone features of tiles (``features``); :func:`load_or_extract` caches them.
- :func:`build_gdc_cohort` — a GDC/TCGA download (sample sheets, STAR counts, slides) as a cohort
(``cohorts``).
- :func:`load_bundle` — a model bundle (``model``).
- :func:`spatialize` — the main job: heatmaps, tile scores and slide-level predictions of a slide (``maps``).
- :func:`predict` — slide-level predictions and per-tile scores of a slide, in memory (``maps``).
- :class:`Comparison` — a heatmap against QuPath cells, a mask or annotations (``validation``).
- :func:`align_slides` — an IHC slide onto its H&E (``validation``).

The package is organised by stage: ``slides/`` → ``features/`` → ``cohorts/`` → ``model/`` → ``maps/`` →
``validation/``, with the faces ``napari/`` and ``commands/`` and the research wings ``transfer/``,
``slide_ex/`` and ``synthetic/``. The compute library (all but ``napari/``) never imports Qt or napari.
"""

from __future__ import annotations

import importlib

from . import _compat

__version__ = "0.1.0"

#: Public name -> the module that defines it.
PUBLIC_API: dict[str, str] = {
    "open_slide": "slides.slide",
    "tile_grid": "slides.tiling",
    "extract_features": "features.extraction",
    "load_or_extract": "features.cache",
    "build_gdc_cohort": "cohorts.gdc",
    "load_bundle": "model.bundle",
    "spatialize": "maps.spatialize",
    "predict": "maps.predict",
    "Comparison": "validation.comparison",
    "align_slides": "validation.align",
}

__all__ = ["__version__", *PUBLIC_API]

_compat.install()


def __getattr__(name: str):
    if name in PUBLIC_API:
        value = getattr(importlib.import_module(f".{PUBLIC_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *PUBLIC_API})
