"""Bundles that take some genes from the linear baseline, or blend both models: model/mixed.py, bundle.py.

Every number is checked against the fold modules themselves: an HE2RNA gene's tile score is the mean over
folds of its MLP's output and its slide prediction the top-k means over ``ks``; a linear gene's tile score
is the mean over folds of its linear map and its slide prediction the mean of its tile scores.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from napari_he2rna.cli import main
from napari_he2rna.errors import ModelError
from napari_he2rna.features.hed_stats import HED_STATS_FEATURES
from napari_he2rna.maps import map_display
from napari_he2rna.maps.session import SlideSession
from napari_he2rna.model.baseline import linear_module
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.network import HE2RNA

SLIDE = Path(__file__).resolve().parents[1] / "sample_data" / "sample_slide.tiff"
GENES = ["CD3D", "CD3E", "MKI67", "KRT8", "GAPDH"]
KS = (1, 3, 10)
HIDDEN = (16, 16)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fold_modules(dim: int, seed: int = 0, n_folds: int = 3):
    """Random HE2RNA fold modules and random linear fold modules (as the ridge baseline makes them)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mlps = [HE2RNA(dim, len(GENES), HIDDEN, dropout=0.0).eval() for _ in range(n_folds)]
    linear = [
        linear_module(rng.normal(size=(dim, len(GENES))), rng.normal(size=len(GENES))) for _ in range(n_folds)
    ]
    return mlps, linear


def save(path, mlps, linear=None, linear_genes=None, dim=8, backbone="toy", **kw):
    return save_bundle(
        path,
        mlps,
        GENES,
        backbone,
        dim,
        112.0,
        KS,
        {"note": 1},
        linear_models=linear,
        linear_genes=linear_genes,
        **kw,
    )


def module_scores(m: HE2RNA, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.from_numpy(x).T[None])[0].T.numpy()  # (N, genes)


def topk_means(s: np.ndarray, ks=KS) -> np.ndarray:
    """Per column, the mean over k of the mean of the k highest values (written out, not the package's)."""
    desc = -np.sort(-s, axis=0)
    return np.mean([desc[: min(k, len(s))].mean(axis=0) for k in ks], axis=0)


def expected(mlps, linear, x, linear_genes):
    """(tile scores (N, G), slide predictions (G,)) computed from the modules directly."""
    lin = np.array([g in linear_genes for g in GENES])
    mlp_tiles = [module_scores(m, x) for m in mlps]
    lin_tiles = [module_scores(m, x) for m in linear]
    tiles = np.where(lin, np.mean(lin_tiles, axis=0), np.mean(mlp_tiles, axis=0))
    slide = np.where(
        lin,
        np.mean([t.mean(axis=0) for t in lin_tiles], axis=0),
        np.mean([topk_means(t) for t in mlp_tiles], 0),
    )
    return tiles, slide


# the extra hidden columns are the linear genes' scores (2 <= d = 8) or the features (4 > d = 3)
CASES = [(8, ["CD3D", "KRT8"]), (3, ["CD3D", "CD3E", "KRT8", "GAPDH"])]


@pytest.mark.parametrize(("dim", "linear_genes"), CASES)
def test_tile_scores_and_slide_predictions_come_from_the_right_model(tmp_path, dim, linear_genes):
    mlps, linear = fold_modules(dim)
    bundle = load_bundle(save(tmp_path / "m.safetensors", mlps, linear, linear_genes[::-1], dim=dim))
    assert bundle.linear_genes == linear_genes  # in the bundle's gene order
    x = np.random.default_rng(1).normal(size=(40, dim)).astype(np.float32)
    tiles, slide = expected(mlps, linear, x, linear_genes)
    np.testing.assert_allclose(bundle.tile_scores(x), tiles, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bundle.slide_prediction(x), slide, rtol=1e-5, atol=1e-5)
    # any subset, in any order, is the same columns
    pick = ["KRT8", "MKI67", "CD3D"]
    cols = [GENES.index(g) for g in pick]
    np.testing.assert_allclose(bundle.tile_scores(x, pick), tiles[:, cols], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bundle.slide_prediction(x, pick), slide[cols], rtol=1e-5, atol=1e-5)
    # the cached path: hidden activations once, then one product per gene, then the aggregate
    hidden = bundle.hidden_activations(x)
    per_fold = bundle.scores_from_hidden(hidden, pick)
    np.testing.assert_allclose(torch.stack(per_fold).mean(0).numpy(), tiles[:, cols], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        bundle.aggregate_fold_scores(per_fold, pick), slide[cols], rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ModelError, match="pass the genes"):
        bundle.aggregate_fold_scores(per_fold)  # 3 columns are not the 5 genes


def _parts(path: Path) -> tuple[dict, bytes]:
    """(header as a dict, tensor bytes): safetensors writes its metadata map in hash-map order, so two
    saves of one bundle differ in the order of the header's keys only."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def test_a_plain_bundle_is_written_as_before(tmp_path):
    mlps, linear = fold_modules(8)
    plain = save_bundle(tmp_path / "a.safetensors", mlps, GENES, "toy", 8, 112.0, KS, {"note": 1})
    for i, (lin, names) in enumerate([(None, None), (linear, None), (linear, []), (None, [])]):
        other = save(tmp_path / f"b{i}.safetensors", mlps, lin, names)
        assert _parts(other) == _parts(plain) and other.stat().st_size == plain.stat().st_size
    mixed = save(tmp_path / "c.safetensors", mlps, linear, ["CD3D"])
    assert _parts(mixed)[0]["__metadata__"]["sha256"] != _parts(plain)[0]["__metadata__"]["sha256"]
    bundle = load_bundle(plain)
    assert bundle.linear_genes == [] and {bundle.model_of(g) for g in GENES} == {"HE2RNA"}
    assert "linear baseline" not in bundle.describe()
    assert len(bundle.to_modules()) == 3


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"aggregation": "mean"}, "top-k aggregation, not 'mean'"),
        ({"aggregation": "kmeans"}, "top-k aggregation, not 'kmeans'"),
        ({"linear_genes": ["CD3D", "NOPE"]}, r"\['NOPE'\] are not among"),
        ({"linear_genes": ["CD3D", "CD3D"]}, "duplicate"),
        ({"linear": "two folds"}, "2 for 3 fold"),
        ({"linear": None}, "0 for 3 fold"),
        ({"linear": "wider"}, "from 8 features to the 5 genes, not 9 features"),
        ({"linear": "mlp"}, "hidden layers \\[16, 16\\]"),
    ],
)
def test_what_cannot_be_saved_is_refused_in_one_sentence(tmp_path, change, match):
    mlps, linear = fold_modules(8)
    others = {
        "two folds": linear[:2],
        "wider": [linear_module(np.ones((9, 5)), np.zeros(5))] * 3,
        "mlp": mlps,
        None: None,
    }
    lin = others[change["linear"]] if "linear" in change else linear
    kw = {"aggregation": change["aggregation"]} if "aggregation" in change else {}
    out = tmp_path / "m.safetensors"
    with pytest.raises(ModelError, match=match) as err:
        save(out, mlps, lin, change.get("linear_genes", ["CD3D"]), **kw)
    assert "\n" not in str(err.value) and not out.exists()


def test_describe_model_of_and_fine_tuning(tmp_path):
    mlps, linear = fold_modules(8)
    bundle = load_bundle(save(tmp_path / "m.safetensors", mlps, linear, ["KRT8", "CD3D"]))
    assert [bundle.model_of(g) for g in GENES] == [
        "linear baseline",
        "HE2RNA",
        "HE2RNA",
        "linear baseline",
        "HE2RNA",
    ]
    assert "2 of 5 genes from the linear baseline (ridge on the slide-mean feature" in bundle.describe()
    assert "tile scores): CD3D, KRT8." in bundle.describe()
    with pytest.raises(ModelError, match="retrain with --model-type he2rna"):
        bundle.to_modules()
    # the modules as trained come back (the MLP's every output, the linear genes' maps)
    he2rna, lin = bundle.fold_modules()
    x = np.random.default_rng(2).normal(size=(7, 8)).astype(np.float32)
    for m, back in zip(mlps, he2rna, strict=True):
        np.testing.assert_allclose(module_scores(back, x), module_scores(m, x), rtol=1e-6)
    for m, back in zip(linear, lin, strict=True):
        np.testing.assert_allclose(module_scores(back, x), module_scores(m, x)[:, [0, 3]], rtol=1e-6)


def _rewrite(src: Path, dst: Path, doc_change=None, tensor_change=None) -> Path:
    """A copy of a bundle with its header document or its tensors edited (the checksum kept as it was)."""
    from safetensors.torch import load
    from safetensors.torch import save as st_save

    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    doc = json.loads(meta["he2rna"])
    tensors = load(data)
    if doc_change:
        doc_change(doc)
    if tensor_change:
        tensor_change(tensors)
    meta["he2rna"] = json.dumps(doc, sort_keys=True)
    dst.write_bytes(st_save(tensors, metadata=meta))
    return dst


@pytest.mark.parametrize(
    ("doc_change", "tensor_change", "match"),
    [
        (lambda d: d.pop("linear_genes"), None, r"unexpected \['linear0.bias'"),
        (lambda d: d.update(linear_genes=["CD3D", "NOPE"]), None, "not its own or are repeated"),
        (lambda d: d.update(linear_genes="CD3D"), None, "malformed list of linear-baseline genes"),
        (
            lambda d: d.update(linear_genes=["CD3D", "KRT8", "MKI67"]),
            None,
            r"linear0.weight has shape \(2, 8\), expected \(3, 8\)",
        ),
        (lambda d: d.update(aggregation="mean"), None, "linear-baseline genes with the 'mean' aggregation"),
        (None, lambda t: t.pop("linear2.weight"), r"missing \['linear2.weight'\]"),
        (None, lambda t: t["linear1.weight"].mul_(2), "failed its checksum"),
    ],
)
def test_a_file_whose_linear_part_does_not_fit_its_header_is_one_sentence(
    tmp_path, doc_change, tensor_change, match
):
    mlps, linear = fold_modules(8)
    good = save(tmp_path / "m.safetensors", mlps, linear, ["CD3D", "KRT8"])
    bad = _rewrite(good, tmp_path / "bad.safetensors", doc_change, tensor_change)
    with pytest.raises(ModelError, match=match) as err:
        load_bundle(bad)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the viewer's session
@pytest.fixture(scope="module")
def sample_grid():
    from napari_he2rna.slides.slide import open_slide
    from napari_he2rna.slides.tiling import tile_grid

    with open_slide(SLIDE) as s:
        return tile_grid(s, tile_um=112.0)


@pytest.mark.parametrize(("dim", "linear_genes"), CASES)
def test_the_session_and_its_progressive_buffers_give_the_bundles_numbers(
    tmp_path, sample_grid, dim, linear_genes
):
    mlps, linear = fold_modules(dim)
    bundle = load_bundle(save(tmp_path / "m.safetensors", mlps, linear, linear_genes, dim=dim))
    grid = sample_grid
    x = np.random.default_rng(3).normal(size=(len(grid.table), dim)).astype(np.float32)
    tiles, slide = expected(mlps, linear, x, linear_genes)
    with SlideSession.open(SLIDE, model=bundle) as session:
        # a progressive run: half the tiles, painted from the session's hidden buffers
        session.start_live(grid, bundle, dim)
        half = np.arange(0, len(x), 2)
        session.take_batch(bundle, half, x[half])
        for j, g in enumerate(GENES):
            np.testing.assert_allclose(session.scores(g)[half], tiles[half, j], rtol=1e-5, atol=1e-5)
            assert np.isnan(session.scores(g)[1])
        rest = np.arange(1, len(x), 2)
        session.take_batch(bundle, rest, x[rest])
        live_hidden = session.live.hidden
        session.set_features(grid, x, "toy")
        assert session.hidden() is live_hidden  # the run's buffers are kept: they are these features'
        for j, g in enumerate(GENES):
            np.testing.assert_allclose(session.scores(g), tiles[:, j], rtol=1e-5, atol=1e-5)
        got = session.gene_slide_predictions(GENES, chunk=2)  # chunks mixing both kinds of gene
        np.testing.assert_allclose([got[g] for g in GENES], slide, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            session.slide_predictions(["CD3D+MKI67"]).iloc[0], slide[[0, 2]].mean(), rtol=1e-5
        )
        # the Model dock's colour-bar label says which model made the map
        first = {g: map_display.legend(session, g).split("\n")[0] for g in ("CD3D", "MKI67", "CD3D+MKI67")}
        assert first == {
            "CD3D": "CD3D (linear baseline)",
            "MKI67": "MKI67",
            "CD3D+MKI67": "CD3D+MKI67 (HE2RNA + linear baseline)",
        }
        assert map_display.legend(session, "CD3D", "uncertainty").startswith(
            "CD3D fold spread (linear baseline)"
        )
        # and so does the PNG's subtitle (render_heatmap_png's ``model``), HE2RNA alone left unsaid
        assert map_display.png_options(session, "CD3D")["model"] == "linear baseline"
        assert map_display.png_options(session, "MKI67")["model"] == "HE2RNA"


def tiny_cohort(seed: int, n: int):
    """A cohort of ``n`` one-sample patients with 5-19 random 8-d tiles each; folds ``i % 3``."""
    from napari_he2rna.cohorts.cohort import load_expression, load_samples, match_cohort

    rng = np.random.default_rng(seed)
    ids = [f"S{i:02d}" for i in range(n)]
    feats = {s: rng.normal(size=(int(rng.integers(5, 20)), 8)).astype(np.float32) for s in ids}
    expr = pd.DataFrame(rng.uniform(1, 5, size=(n, len(GENES))), index=ids, columns=GENES)
    samples = pd.DataFrame({"sample_id": ids, "patient_id": ids, "cancer_type": "A"})
    cohort = match_cohort(load_expression(expr, filter_zero_median=False), load_samples(samples), feats)[0]
    return cohort, feats, {s: i % 3 for i, s in enumerate(ids)}


def test_out_of_fold_predictions_of_a_mixed_bundle(tmp_path):
    from napari_he2rna.model.cohort_prediction import bundle_oof_predictions

    cohort, feats, folds = tiny_cohort(4, 9)
    mlps, linear = fold_modules(8)
    bundle = load_bundle(
        save_bundle(
            tmp_path / "m.safetensors",
            mlps,
            GENES,
            "toy",
            8,
            112.0,
            KS,
            {"folds": folds},
            linear_models=linear,
            linear_genes=["CD3D", "KRT8"],
        )
    )
    pred, fold_of = bundle_oof_predictions(bundle, cohort, device="cpu")
    for s in cohort.sample_ids:
        f = folds[s]
        _, want = expected([mlps[f]], [linear[f]], feats[s], ["CD3D", "KRT8"])
        np.testing.assert_allclose(pred.loc[s, GENES].to_numpy(), want, rtol=1e-4, atol=1e-4)
    assert list(fold_of) == [folds[s] for s in cohort.sample_ids]


# ----------------------------------------------------------------------------- the CLI's sidecars
def test_the_sidecar_says_which_model_made_each_map(tmp_path):
    dim = len(HED_STATS_FEATURES)
    mlps, linear = fold_modules(dim)
    model = save(tmp_path / "m.safetensors", mlps, linear, ["CD3D", "KRT8"], dim=dim, backbone="hed-stats")
    out = tmp_path / "pred"
    names = "MKI67,KRT8,CD3D+CD3E"
    assert main(["predict", str(SLIDE), "--model", str(model), "--genes", names, "--out", str(out)]) == 0
    meta = json.loads((out / "sample_slide_tile_scores.json").read_text())
    assert meta["map_models"] == {
        "MKI67": "HE2RNA",
        "KRT8": "linear baseline",
        "CD3D+CD3E": "HE2RNA + linear baseline",
    }
    # the tile table holds the model's numbers: a linear gene's column is its linear map's fold mean
    from napari_he2rna.features.cache import load_or_extract
    from napari_he2rna.features.extraction import ExtractOptions
    from napari_he2rna.slides.slide import open_slide

    bundle = load_bundle(model)
    with open_slide(SLIDE) as s:
        _, feats = load_or_extract(s, "hed-stats", ExtractOptions.for_model(bundle), device="cpu")
    tiles, _ = expected(mlps, linear, np.asarray(feats, np.float32), ["CD3D", "KRT8"])
    table = pd.read_csv(out / "sample_slide_tile_scores.csv")
    np.testing.assert_allclose(table["KRT8"], tiles[:, 3], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(table["CD3D+CD3E"], tiles[:, :2].mean(1), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------- the ensemble: every gene blends both models
def blended(mlps, linear, x, weight=0.5):
    """(tile scores (N, G), slide predictions (G,)) of the blend, from the modules directly: per fold
    (1 - w) MLP + w linear per tile, HE2RNA's top-k means of that, then the mean over folds."""
    per_fold = [
        (1 - weight) * module_scores(m, x) + weight * module_scores(lin, x)
        for m, lin in zip(mlps, linear, strict=True)
    ]
    return np.mean(per_fold, axis=0), np.mean([topk_means(t) for t in per_fold], axis=0)


@pytest.mark.parametrize("dim", [8, 3])  # the extra columns: the genes' scores (5 <= 8) or the features
def test_an_ensemble_bundle_blends_every_gene(tmp_path, sample_grid, dim):
    from napari_he2rna.model.blend import Blend
    from napari_he2rna.model.mixed import BLEND_NAME

    mlps, linear = fold_modules(dim, seed=5)
    bundle = load_bundle(save(tmp_path / "e.safetensors", mlps, linear, GENES, dim=dim, linear_weight=0.5))
    assert bundle.linear_weight == 0.5 and bundle.linear_genes == GENES
    x = np.random.default_rng(6).normal(size=(len(sample_grid.table), dim)).astype(np.float32)
    tiles, slide = blended(mlps, linear, x)
    np.testing.assert_allclose(bundle.tile_scores(x), tiles, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bundle.slide_prediction(x), slide, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bundle.slide_prediction(x, ["KRT8", "CD3D"]), slide[[3, 0]], rtol=1e-5)
    # the Blend module (what training predicts held-out samples with) is the same model
    with torch.no_grad():
        b0 = Blend(mlps[0], linear[0])(torch.from_numpy(x).T[None])[0].T.numpy()
    np.testing.assert_allclose(b0, 0.5 * module_scores(mlps[0], x) + 0.5 * module_scores(linear[0], x), 1e-6)
    assert bundle.model_of("MKI67") == BLEND_NAME
    assert bundle.describe().startswith("HE2RNA + linear baseline model: 5 genes")
    assert "0.5 x HE2RNA's + 0.5 x the linear baseline's" in bundle.describe()
    with SlideSession.open(SLIDE, model=bundle) as session:
        session.start_live(sample_grid, bundle, dim)
        session.take_batch(bundle, np.arange(len(x)), x)
        session.set_features(sample_grid, x, "toy")
        for j, g in enumerate(GENES):
            np.testing.assert_allclose(session.scores(g), tiles[:, j], rtol=1e-5, atol=1e-5)
        got = session.gene_slide_predictions(GENES, chunk=2)
        np.testing.assert_allclose([got[g] for g in GENES], slide, rtol=1e-5, atol=1e-5)
        assert map_display.legend(session, "CD3D").split("\n")[0] == f"CD3D ({BLEND_NAME})"
        assert map_display.png_options(session, "CD3D")["model"] == BLEND_NAME


def test_out_of_fold_predictions_of_an_ensemble_bundle(tmp_path):
    from napari_he2rna.model.cohort_prediction import bundle_oof_predictions

    cohort, feats, folds = tiny_cohort(7, 6)
    ids = cohort.sample_ids
    mlps, linear = fold_modules(8, seed=8)
    path = save(tmp_path / "e.safetensors", mlps, linear, GENES, linear_weight=0.5)
    meta_bundle = load_bundle(path)
    meta_bundle.metadata["folds"] = folds
    pred, _ = bundle_oof_predictions(meta_bundle, cohort, device="cpu")
    for s in ids:
        f = folds[s]
        _, want = blended([mlps[f]], [linear[f]], feats[s])
        np.testing.assert_allclose(pred.loc[s, GENES].to_numpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("genes", "weight", "match"),
    [
        (["CD3D", "KRT8"], 0.5, "a blend covers every gene"),
        (GENES, 0.0, r"must lie in \(0, 1\]"),
        (GENES, 1.5, r"must lie in \(0, 1\]"),
    ],
)
def test_an_ensemble_that_does_not_fit_is_refused(tmp_path, genes, weight, match):
    mlps, linear = fold_modules(8)
    with pytest.raises(ModelError, match=match):
        save(tmp_path / "bad.safetensors", mlps, linear, genes, linear_weight=weight)
    assert not (tmp_path / "bad.safetensors").exists()
