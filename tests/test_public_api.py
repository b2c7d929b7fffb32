"""The package root: a small lazy public API, the old flat import paths still answered (deprecated), and the
example of docs/api.md run as a doctest."""

from __future__ import annotations

import doctest
import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import napari_he2rna
from napari_he2rna import _compat

ROOT = Path(__file__).resolve().parents[1]


def test_import_loads_no_torch_qt_or_napari():
    code = (
        "import sys, json, napari_he2rna\n"
        "heavy = ('torch', 'qtpy', 'PyQt5', 'PySide2', 'PyQt6', 'napari', 'vispy', 'sklearn', 'zarr')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_every_public_name_resolves_to_its_module():
    assert set(napari_he2rna.__all__) == {"__version__", *napari_he2rna.PUBLIC_API}
    for name, module in napari_he2rna.PUBLIC_API.items():
        value = getattr(napari_he2rna, name)
        assert value is getattr(importlib.import_module(f"napari_he2rna.{module}"), name)
    with pytest.raises(AttributeError):
        napari_he2rna.no_such_name  # noqa: B018


# The old flat modules (before the stage folders) and one name each that code outside used from them.
OLD_PATHS = {
    "slide": "open_slide",
    "tiling": "tile_grid",
    "ink": "ink_mask",
    "backbones": "get_backbone",
    "features": "extract_features",
    "feature_cache": "load_or_extract",
    "extract_cohort": "extract_cohort",
    "precision": "resolve_precision",
    "devices": "resolve_device",
    "cohort": "load_expression",
    "model": "load_bundle",
    "training": "cross_validate",
    "folds": "group_folds",
    "scaling": "FeatureScaler",
    "baseline": "fit_ridge",
    "fitting": "fit",
    "evaluation": "pearson_columns",
    "ood": "assess",
    "demo": "build_demo_model",
    "session": "SlideSession",
    "spatial": "score_tiles",
    "progressive": "spread_order",
    "readout": "output_unit",
    "truth": "load_truth",
    "compare": "tile_metrics",
    "comparison": "Comparison",
    "align": "align_slides",
}


def test_old_paths_are_listed():
    assert set(OLD_PATHS) == set(_compat.MOVED)


def test_old_import_paths_still_work_with_a_deprecation_warning():
    # one fresh interpreter for all of them: each old path warns on its first import
    code = (
        "import importlib, json, warnings\n"
        "import napari_he2rna\n"
        "from napari_he2rna import _compat\n"
        f"old_paths = {OLD_PATHS!r}\n"
        "report = {}\n"
        "for old, name in old_paths.items():\n"
        "    with warnings.catch_warnings(record=True) as seen:\n"
        "        warnings.simplefilter('always')\n"
        "        module = importlib.import_module('napari_he2rna.' + old)\n"
        "        value = getattr(module, name)\n"
        "    owners = [t for t in _compat.MOVED[old]\n"
        "              if getattr(importlib.import_module('napari_he2rna.' + t), name, None) is value]\n"
        "    warned = [str(w.message) for w in seen if issubclass(w.category, DeprecationWarning)]\n"
        "    report[old] = {'owners': owners, 'warned': warned}\n"
        "print(json.dumps(report))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for old, seen in report.items():
        assert seen["owners"], f"napari_he2rna.{old}.{OLD_PATHS[old]} is not the new module's object"
        assert any("0.3" in w and f"napari_he2rna.{old} moved" in w for w in seen["warned"]), (old, seen)


def test_stage_folder_that_took_an_old_module_name_still_forwards():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        from napari_he2rna.model import load_bundle  # the old napari_he2rna.model module's name
    from napari_he2rna.model.bundle import load_bundle as real

    assert load_bundle is real
    assert any(issubclass(w.category, DeprecationWarning) for w in seen)


def test_api_doc_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HE2RNA_CACHE", str(tmp_path / "cache"))
    result = doctest.testfile(
        str(ROOT / "docs" / "api.md"),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        globs={"tmp_path": tmp_path},
    )
    assert result.attempted >= 8
    assert result.failed == 0
