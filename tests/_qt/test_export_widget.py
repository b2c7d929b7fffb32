"""The Export dock widget in a real napari viewer: CSV / GeoJSON / TIFF exports, overwrite questions, errors.

Run with ``xvfb-run -a .venv/bin/python -m pytest tests/_qt/test_export_widget.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from qtpy.QtWidgets import QFileDialog, QMessageBox

from napari_he2rna.maps import exports
from napari_he2rna.model.bundle import save_bundle
from napari_he2rna.model.network import HE2RNA
from napari_he2rna.napari._export_widget import ExportWidget
from napari_he2rna.napari._model_widget import ModelWidget
from napari_he2rna.napari._state import get_registry

REPO = Path(__file__).resolve().parents[2]
GENES = ["CD3D", "CD3E", "CD3G", "CD247", "CD19", "MS4A1", "MKI67", "TP63", "KRT8", "KRT18", "ACTB", "GAPDH"]


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = HE2RNA(33, len(GENES), hidden=(16,), dropout=0.0)
    path = tmp_path_factory.mktemp("model") / "test_model.safetensors"
    return save_bundle(path, [net], GENES, "hed-stats", 33, 112.0, ks=[1, 10])


@pytest.fixture
def painted(make_napari_viewer, qtbot, sample_slide, model_path):
    """A viewer with the sample slide run, CD3D painted and pinned, then T cells painted, both widgets docked
    (one active heatmap per slide: a second gene to export is pinned first)."""
    viewer = make_napari_viewer()
    (slide_layer,) = viewer.open(str(sample_slide), plugin="napari-he2rna")
    model = ModelWidget(viewer, model_path=model_path)
    export = ExportWidget(viewer)
    viewer.window.add_dock_widget(model, name="Model")
    viewer.window.add_dock_widget(export, name="Export")
    assert model.run() is not None
    qtbot.waitUntil(lambda: not model.running, timeout=240_000)
    assert model.paint("CD3D") is not None and model.pin() is not None
    assert model.paint("T cells") is not None
    session = get_registry(viewer).get(slide_layer).session
    return viewer, model, export, session


def _answer(monkeypatch, yes: bool) -> list[str]:
    asked: list[str] = []

    def question(parent, title, text, *args, **kwargs):
        asked.append(text)
        return QMessageBox.StandardButton.Yes if yes else QMessageBox.StandardButton.No

    monkeypatch.setattr(QMessageBox, "question", question)
    return asked


def test_export_csv_via_dialog_and_never_overwrite_silently(painted, tmp_path, monkeypatch, notifications):
    viewer, model, export, session = painted
    assert export.painted_names() == ["T cells", "CD3D"]  # layer order: the active heatmap, then the pin
    assert export.chosen_names() == ["T cells", "CD3D"]

    target = tmp_path / "scores.csv"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), "CSV (*.csv)"))
    asked = _answer(monkeypatch, yes=False)
    written = export.export_csv()
    assert written is not None and written[0] == target and target.is_file()
    assert asked == []  # nothing existed: no question
    assert any(str(target) in m for _, m in notifications)

    table = pd.read_csv(target, comment="#")
    grid = session.grid
    assert len(table) == len(grid.table)
    assert list(table.columns) == [*exports.TILE_CSV_COLUMNS, "T cells", "CD3D"]
    np.testing.assert_array_equal(table["tile_id"], grid.table["tile_id"])
    np.testing.assert_allclose(table["CD3D"], session.scores("CD3D"), rtol=1e-5)
    np.testing.assert_allclose(table["T cells"], session.scores("T cells"), rtol=1e-5)
    side = exports.slide_csv_path(target)
    assert side.is_file()

    # exporting again onto the same file asks; "No" leaves the file as it was
    before = target.read_bytes()
    export.set_checked(["CD3D"])
    assert export.export_csv() is None
    assert len(asked) == 1 and str(target) in asked[0]
    assert str(exports.tile_metadata_path(target)) in asked[0]  # the sidecar it would replace is named too
    assert target.read_bytes() == before
    # "Yes" replaces it, now with only the ticked column
    _answer(monkeypatch, yes=True)
    assert export.export_csv(target) is not None
    assert list(pd.read_csv(target, comment="#").columns) == [*exports.TILE_CSV_COLUMNS, "CD3D"]


def test_export_geojson_and_tiff(painted, tmp_path, monkeypatch):
    viewer, model, export, session = painted
    grid = session.grid
    _answer(monkeypatch, yes=False)
    geo = export.export_geojson(tmp_path / "tiles.geojson")
    doc = json.loads(geo.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(grid.table)
    first = doc["features"][0]
    assert first["properties"]["measurements"]["CD3D"] == pytest.approx(
        float(session.scores("CD3D")[0]), abs=1e-5
    )
    x, y = int(grid.table["x"].iloc[0]), int(grid.table["y"].iloc[0])
    assert first["geometry"]["coordinates"][0][0] == [x, y]  # level-0 px, x first

    export.set_checked(["T cells"])
    (tif,) = export.export_tiff(tmp_path / "tcells.tif")
    raster = tifffile.imread(tif)
    assert raster.shape == (grid.n_rows, grid.n_cols)
    np.testing.assert_allclose(raster, session.raster("T cells"), equal_nan=True)

    # several names: one TIFF each in the chosen folder
    export.set_checked(["CD3D", "T cells"])
    out = tmp_path / "many"
    out.mkdir()
    written = export.export_tiff(out)
    assert sorted(p.name for p in written) == sorted(
        f"{Path(session.slide.path).stem}_{n}.tif" for n in ("CD3D", "T_cells")
    )


def test_export_errors_are_notifications(painted, tmp_path, monkeypatch, notifications):
    viewer, model, export, session = painted
    _answer(monkeypatch, yes=True)
    missing = tmp_path / "no_such_folder" / "scores.csv"
    assert export.export_csv(missing) is None
    assert not missing.parent.exists()
    assert any(sev == "error" and "no_such_folder" in m for sev, m in notifications)
    # a typed name that is not a gene: a message, nothing written
    export.extra_edit.setText("NOTAGENE9")
    target = tmp_path / "x.csv"
    assert export.export_csv(target) is None and not target.exists()
    assert any("NOTAGENE9" in m for _, m in notifications)
    export.extra_edit.clear()
    # nothing ticked
    export.set_checked([])
    assert export.export_csv(target) is None
    assert any("Tick or type" in m for _, m in notifications)
    # a closed heatmap leaves the list
    viewer.layers.remove(model.heatmap_layer(get_registry(viewer).states()[0], "CD3D"))
    assert export.painted_names() == ["T cells"]
    assert list(tmp_path.iterdir()) == []


def test_export_h5ad_reads_back_asks_before_replacing_and_fails_in_one_sentence(
    painted, tmp_path, monkeypatch, notifications
):
    import anndata

    viewer, model, export, session = painted
    grid = session.grid
    target = tmp_path / "tiles.h5ad"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "tiles"), ""))
    asked = _answer(monkeypatch, yes=False)
    assert export.export_h5ad() == target  # the dialog's name gets its .h5ad
    assert asked == [] and any(str(target) in m for _, m in notifications)
    adata = anndata.read_h5ad(target)
    assert list(adata.var_names) == ["T cells", "CD3D"] and adata.n_obs == len(grid.table)
    np.testing.assert_array_equal(adata.obsm["spatial"], grid.table[["x", "y"]].to_numpy(float))
    np.testing.assert_allclose(adata.X[:, 1], session.scores("CD3D"), rtol=1e-6)
    assert list(adata.uns["napari_he2rna"]["score_columns"])[:2] == ["T cells", "CD3D"]

    # an existing file is replaced only after a "Yes"
    before = target.read_bytes()
    export.set_checked(["CD3D"])
    assert export.export_h5ad(target) is None and len(asked) == 1 and str(target) in asked[0]
    assert target.read_bytes() == before
    _answer(monkeypatch, yes=True)
    assert export.export_h5ad(target) == target
    assert list(anndata.read_h5ad(target).var_names) == ["CD3D"]

    # failures are one sentence, never a traceback; nothing is left behind
    missing = tmp_path / "no_such_folder" / "t.h5ad"
    assert export.export_h5ad(missing) is None and not missing.parent.exists()
    assert any(sev == "error" and "no_such_folder" in m for sev, m in notifications)

    def broken(*args, **kwargs):
        raise RuntimeError("HDF5 is unhappy")

    monkeypatch.setattr(session, "export_h5ad", broken)
    assert export.export_h5ad(tmp_path / "other.h5ad") is None
    errors = [m for sev, m in notifications if sev == "error"]
    assert "RuntimeError: HDF5 is unhappy" in errors[-1] and "\n" not in errors[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles.h5ad"]
