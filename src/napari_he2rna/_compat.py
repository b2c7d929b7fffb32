"""Old import paths of the flat package, kept importable for one release (0.2) with a DeprecationWarning.

Until 0.2 every module lived at the package root; they now live in the stage folders. ``import
napari_he2rna.slide`` (or ``from napari_he2rna import slide``) still works: a finder on ``sys.meta_path``
answers each old name with a stand-in module whose attributes are looked up, on use, in the new modules that
hold them now (a module split in two is answered by both). Patching a stand-in does not patch the code: tests
and new code use the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

#: Old module -> the modules that hold its names now (searched in this order).
MOVED: dict[str, tuple[str, ...]] = {
    "slide": ("slides.slide", "slides.backends", "slides.native_tiles", "slides.pixels"),
    "tiling": ("slides.tiling",),
    "ink": ("slides.ink",),
    "backbones": ("features.backbones", "features.hub", "features.resnet", "features.hed_stats"),
    "features": ("features.extraction",),
    "feature_cache": ("features.cache",),
    "extract_cohort": ("features.cohort_tasks",),
    "precision": ("features.precision",),
    "devices": ("features.devices",),
    "cohort": ("cohorts.cohort",),
    "model": ("model.bundle", "model.network", "model.convert"),
    "training": ("model.training", "model.cohort_prediction"),
    "folds": ("model.folds",),
    "scaling": ("model.scaling",),
    "baseline": ("model.baseline",),
    "fitting": ("model.fitting",),
    "evaluation": ("model.evaluation",),
    "ood": ("model.ood",),
    "demo": ("model.demo",),
    "session": ("maps.session", "maps.spatialize", "maps.progressive", "maps.gene_sets", "maps.exports"),
    "spatial": ("maps.gene_sets", "maps.scoring", "maps.heatmaps", "maps.exports"),
    "progressive": ("maps.progressive",),
    "readout": ("maps.readout",),
    "truth": (
        "validation.truth",
        "validation.cells",
        "validation.masks",
        "validation.annotations",
        "validation.transform",
        "validation.geojson",
        "validation.grid",
    ),
    "compare": ("validation.metrics",),
    "comparison": ("validation.comparison",),
    "align": (
        "validation.align",
        "validation.align_image",
        "validation.landmarks",
        "validation.synthetic_sections",
    ),
}

#: Old module names that are now packages of the same name: ``napari_he2rna.features`` and
#: ``napari_he2rna.model`` are the stage folders, and their ``__init__`` forwards the old modules' names.
SHADOWED = ("features", "model")

_PACKAGE = __name__.rsplit(".", 1)[0]


def moved_message(old: str) -> str:
    new = " and ".join(f"{_PACKAGE}.{m}" for m in MOVED[old])
    return f"{_PACKAGE}.{old} moved to {new}; the old path goes away in version 0.3."


def forwarding_getattr(old: str):
    """A module ``__getattr__`` that finds ``name`` in the modules now holding ``old``'s names."""
    targets = MOVED[old]

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for target in targets:
            module = importlib.import_module(f"{_PACKAGE}.{target}")
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {_PACKAGE}.{old} (moved) has no attribute {name!r}")

    return __getattr__


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        old = module.__name__.rsplit(".", 1)[1]
        warnings.warn(moved_message(old), DeprecationWarning, stacklevel=2)
        module.__getattr__ = forwarding_getattr(old)  # type: ignore[attr-defined]
        module.__doc__ = f"Deprecated stand-in: {moved_message(old)}"
        module.__dir__ = lambda: sorted(  # type: ignore[attr-defined]
            {n for t in MOVED[old] for n in dir(importlib.import_module(f"{_PACKAGE}.{t}"))}
        )


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        pkg, _, old = fullname.rpartition(".")
        if pkg != _PACKAGE or old not in MOVED or old in SHADOWED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader())


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())


def stage_getattr(package: str, old: str):
    """``__getattr__`` for a stage folder that took the name of an old module: the old module's names are
    found, with a DeprecationWarning."""
    forward = forwarding_getattr(old)

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = forward(name)
        warnings.warn(f"{package}.{name}: {moved_message(old)}", DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
