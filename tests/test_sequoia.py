"""SEQUOIA's published HE2RNA weights: snapshot folders and hub ids in, one bundle out, their forward pass.

The SEQUOIA authors put their HE2RNA re-trainings on the Hugging Face hub as
``gevaertlab/he2rna-{cancer}-{fold}`` (saved with ``PyTorchModelHubMixin``: ``model.safetensors`` with
``conv0``/``conv1``/``conv2`` ``.weight`` ``[out, in, 1]`` and ``.bias``, and a ``config.json`` of the init
arguments). Here five folds of small random weights are written in exactly that layout (a 2048-d variant as
published and a 16-d one), as folders and in an offline hub cache, converted with ``he2rna convert``, and the
bundle's outputs are compared with a forward pass written here from the description (k-means of the tile
features, 100 clusters, ``random_state=0``; conv layers with ReLU between them; per k the top-k mean over the
cluster scores; mean over ks; mean over folds).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from napari_he2rna.cli import main
from napari_he2rna.commands import convert as convert_cmd
from napari_he2rna.errors import ModelError
from napari_he2rna.model import aggregation
from napari_he2rna.model.aggregation import FewTilesWarning, kmeans_cluster_means
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.convert import DEFAULT_UNIT, PRESETS, read_gene_list
from napari_he2rna.model.network import HE2RNA

huggingface_hub = pytest.importorskip("huggingface_hub")
hub_constants = pytest.importorskip("huggingface_hub.constants")

KS = [1, 2, 5, 10, 20, 50, 100]
GENES = ["ESR1", "ERBB2", "MKI67", "CD3D", "KRT8", "PGR", "TP53"]
#: (features per tile, hidden layers): as published, and a small-feature variant.
VARIANTS = {"2048-d": (2048, [256, 256]), "16-d": (16, [12, 12])}
REV = "5a1b7c0de5a1b7c0de5a1b7c0de5a1b7c0de5a1b"

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_kmeans_thread")


@pytest.fixture
def one_kmeans_thread():
    """scikit-learn's k-means on one OpenMP/BLAS thread: on a busy shared 2-core machine its spinning threads
    make a 100-cluster k-means of a few hundred tiles take 15 s instead of 0.5 s."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def _write_snapshot(folder, input_dim, layers, n_genes, seed):
    """One fold as PyTorchModelHubMixin.save_pretrained writes SEQUOIA's HE2RNA; returns its weights."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    sizes = [input_dim, *layers, n_genes]
    weights = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        weights[f"conv{i}.weight"] = torch.randn(b, a, 1, generator=gen) / np.sqrt(a)
        weights[f"conv{i}.bias"] = 0.1 * torch.randn(b, generator=gen)
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "model.safetensors"))
    # What the mixin records of HE2RNA(input_dim=..., layers=..., ks=..., output_dim=..., device=...).
    config = {
        "bias_init": None,
        "device": "cuda",
        "dropout": 0.5,
        "input_dim": input_dim,
        "ks": KS,
        "layers": list(layers),
        "output_dim": n_genes,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return [
        (weights[f"conv{i}.weight"].numpy(), weights[f"conv{i}.bias"].numpy()) for i in range(len(sizes) - 1)
    ]


def _five_folds(root, variant, cancer="brca"):
    input_dim, layers = VARIANTS[variant]
    folds = {}
    for fold in range(5):
        folder = root / f"he2rna-{cancer}-{fold}"
        folds[folder] = _write_snapshot(folder, input_dim, layers, len(GENES), seed=100 * fold + input_dim)
    return folds


def _cache_repo(cache, hub_id, snapshot):
    """Put a snapshot folder into a hub cache as huggingface_hub lays one out: blobs named by their sha256,
    the snapshot's files symlinks to them, refs/main naming the revision."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / REV).mkdir(parents=True)
    for f in sorted(snapshot.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, repo / "snapshots" / REV), repo / "snapshots" / REV / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, the hub offline (the env, and the constants huggingface_hub read once)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    for var, value in (
        ("HF_HUB_CACHE", str(cache)),
        ("HF_HOME", str(tmp_path / "home")),
        ("HF_HUB_OFFLINE", "1"),
    ):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def _gene_csv(path, genes=GENES):
    path.write_text("gene\n" + "\n".join(genes) + "\n")  # SEQUOIA's examples/gene_list.csv: header `gene`
    return path


def _slide(n_tiles, dim, seed):
    """Tile features like ResNet50's after global average pooling: non-negative, a few kinds of tissue."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(6, dim)))
    kind = rng.integers(0, 6, n_tiles)
    return np.abs(centres[kind] + 0.5 * rng.normal(size=(n_tiles, dim))).astype(np.float32)


def _mlp(x, fold):
    """The conv layers of one fold on rows of ``x``: ReLU between layers, nothing after the last (float64)."""
    h = np.asarray(x, dtype=np.float64)
    for i, (w, b) in enumerate(fold):
        h = h @ w[:, :, 0].T.astype(np.float64) + b
        if i < len(fold) - 1:
            h = np.maximum(h, 0.0)
    return h


def _reference(features, folds, n_clusters=100):
    """SEQUOIA's slide prediction, from the description: per slide the means of the k-means clusters of the
    tile features (scikit-learn, 100 clusters, random_state=0, n_init as scikit-learn 0.21: 10); a cluster
    counts where its mean has a positive feature (their mask); per fold and k the mean of the k highest
    cluster scores of each gene; the mean over ks; the mean over folds."""
    from sklearn.cluster import KMeans

    if len(features) > n_clusters:
        labels = KMeans(n_clusters=n_clusters, random_state=0, n_init=10).fit(features).labels_
        means = np.stack([features[labels == c].mean(axis=0) for c in range(n_clusters)])
    else:
        means = features
    valid = means.max(axis=1) > 0
    assert valid.all()
    per_fold = []
    for fold in folds:
        scores = np.sort(_mlp(means[valid], fold), axis=0)[::-1]  # clusters by score, per gene
        per_fold.append(np.mean([scores[: min(k, len(scores))].mean(axis=0) for k in KS], axis=0))
    return np.mean(per_fold, axis=0)


def _check_against_reference(bundle, folds, features):
    reference = _reference(features, folds)
    np.testing.assert_allclose(bundle.slide_prediction(features), reference, rtol=1e-5, atol=1e-5)
    tiles = np.mean([_mlp(features, fold) for fold in folds], axis=0)
    np.testing.assert_allclose(bundle.tile_scores(features), tiles, rtol=1e-5, atol=1e-5)
    # one gene at a time gives the same numbers
    np.testing.assert_allclose(
        bundle.slide_prediction(features, ["MKI67"]), reference[[2]], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_five_snapshot_folders_become_one_bundle_with_sequoias_forward_pass(tmp_path, capsys, variant):
    folds = _five_folds(tmp_path / "weights", variant)
    out = tmp_path / "brca.safetensors"
    args = ["convert", *map(str, folds), "--genes", str(_gene_csv(tmp_path / "gene_list.csv"))]
    assert main([*args, "--out", str(out), "--preset", "sequoia-he2rna"]) == 0
    printed = capsys.readouterr().out
    assert "k-means clusters" in printed and "256 px at 20x" in printed and DEFAULT_UNIT in printed

    bundle = load_bundle(out)
    dim = VARIANTS[variant][0]
    assert bundle.genes == GENES  # the CSV's header `gene` is no gene
    assert (bundle.n_folds, bundle.feature_dim, bundle.hidden) == (5, dim, tuple(VARIANTS[variant][1]))
    assert bundle.aggregation == "kmeans" and bundle.ks == tuple(KS)
    assert (bundle.tile_px, bundle.tile_magnification, bundle.input_resize) == (256, 20.0, False)
    assert bundle.tile_um == pytest.approx(128.0) and bundle.backbone == "resnet50-imagenet"
    c = bundle.clustering
    assert (c.n_clusters, c.random_state, c.n_init) == (100, 0, 10)
    assert bundle.metadata["output_unit"] == DEFAULT_UNIT and bundle.metadata["preset"] == "sequoia-he2rna"
    assert bundle.metadata["converted_from"] == [f"he2rna-brca-{f}" for f in range(5)]

    _check_against_reference(bundle, list(folds.values()), _slide(260, dim, seed=1))

    # the folder holding the five snapshot folders is the same ensemble, in fold order
    again = tmp_path / "again.safetensors"
    assert (
        main(
            [
                "convert",
                str(tmp_path / "weights"),
                *args[-2:],
                "--out",
                str(again),
                "--preset",
                "sequoia-he2rna",
            ]
        )
        == 0
    )
    other = load_bundle(again)
    assert other.metadata["converted_from"] == bundle.metadata["converted_from"]
    for mine, theirs in zip(bundle.layers, other.layers, strict=True):
        assert all(
            torch.equal(a, b)
            for pair_a, pair_b in zip(mine, theirs, strict=True)
            for a, b in zip(pair_a, pair_b, strict=True)
        )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hub_ids_from_an_offline_cache_are_the_folds_of_one_ensemble(tmp_path, hub_cache, capsys, variant):
    folds = _five_folds(tmp_path / "published", variant)
    ids = [f"gevaertlab/he2rna-brca-{f}" for f in range(5)]
    for hub_id, folder in zip(ids, folds, strict=True):
        _cache_repo(hub_cache, hub_id, folder)
    out = tmp_path / "brca.safetensors"
    genes = _gene_csv(tmp_path / "gene_list.csv")
    assert (
        main(["convert", *ids, "--genes", str(genes), "--out", str(out), "--preset", "sequoia-he2rna"]) == 0
    )
    bundle = load_bundle(out)
    assert bundle.metadata["converted_from"] == ids and bundle.genes == GENES
    _check_against_reference(bundle, list(folds.values()), _slide(230, VARIANTS[variant][0], seed=3))
    # a snapshot folder inside the cache is known by its hub id; without the preset, a warning says what it
    # would miss
    capsys.readouterr()
    snap = hub_cache / "models--gevaertlab--he2rna-brca-0" / "snapshots" / REV
    assert (
        main(["convert", str(snap), "--genes", str(genes), "--out", str(tmp_path / "one.safetensors")]) == 0
    )
    assert "he2rna: warning: gevaertlab/he2rna-brca-0 looks like" in capsys.readouterr().err
    assert load_bundle(tmp_path / "one.safetensors").metadata["converted_from"] == [
        "gevaertlab/he2rna-brca-0"
    ]


def _small_sequoia_bundle(tmp_path):
    """Five 16-d folds in a folder, converted with the preset: (bundle, the folds' weights)."""
    folds = _five_folds(tmp_path / "w", "16-d")
    out = tmp_path / "m.safetensors"
    args = ["--genes", str(_gene_csv(tmp_path / "g.csv")), "--out", str(out), "--preset", "sequoia-he2rna"]
    assert main(["convert", str(tmp_path / "w"), *args]) == 0
    return load_bundle(out), list(folds.values())


def test_a_slide_with_fewer_tiles_than_clusters_uses_its_tiles(tmp_path):
    bundle, folds = _small_sequoia_bundle(tmp_path)
    few = _slide(40, 16, seed=4)
    with pytest.warns(FewTilesWarning, match="40 tiles, fewer than the 100"):
        pred = bundle.slide_prediction(few)
    np.testing.assert_allclose(pred, _reference(few, folds), rtol=1e-5, atol=1e-5)


def test_the_kmeans_is_pinned_and_cached(tmp_path, monkeypatch):
    from sklearn import cluster

    seen = []
    real = cluster.KMeans

    def spy(**kwargs):
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(cluster, "KMeans", spy)
    features = _slide(180, 8, seed=5)
    means = kmeans_cluster_means(features)
    assert means.shape == (100, 8) and means.dtype == np.float32
    assert seen == [{"n_clusters": 100, "random_state": 0, "n_init": 10, "max_iter": 300, "tol": 1e-4}]
    # identical tiles: fewer distinct clusters than asked, said once, none of them empty or NaN
    same = np.repeat(features[:30], 5, axis=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        means = kmeans_cluster_means(same)
    assert len(means) == 30 and np.isfinite(means).all()
    assert [w.category for w in caught] == [FewTilesWarning]

    # the bundle clusters a slide once, however many genes are asked one after the other
    models = [HE2RNA(8, 3, (4,)).eval()]
    genes = ["A", "B", "C"]
    bundle = load_bundle(
        save_bundle(tmp_path / "k.safetensors", models, genes, "x", 8, 128.0, KS, aggregation="kmeans")
    )
    seen.clear()
    for g in genes:
        bundle.slide_prediction(features, [g])
    assert len(seen) == 1


def test_cohort_predictions_of_a_kmeans_bundle_are_its_slide_predictions(tmp_path):
    from napari_he2rna.cohorts.cohort import Cohort
    from napari_he2rna.model.cohort_prediction import bundle_oof_predictions

    bundle, folds = _small_sequoia_bundle(tmp_path)
    features = {f"S{i}": _slide(120 + 10 * i, 16, seed=10 + i) for i in range(3)}
    ids = list(features)
    cohort = Cohort(
        pd.DataFrame(0.0, index=pd.Index(ids, name="sample_id"), columns=GENES),
        pd.DataFrame({"sample_id": ids, "patient_id": ids, "cancer_type": "BRCA"}),
        features,
    )
    preds, fold_of = bundle_oof_predictions(bundle, cohort, device="cpu")
    assert (fold_of == -1).all()  # converted folds: no sample was held out by one of them
    expected = [_reference(features[s], folds) for s in ids]
    np.testing.assert_allclose(preds.to_numpy(), np.stack(expected), rtol=1e-5, atol=1e-5)


def test_bundles_without_the_new_fields_behave_as_before(tmp_path):
    torch.manual_seed(0)
    models = [HE2RNA(8, 3, (4,)).eval() for _ in range(2)]
    path = save_bundle(tmp_path / "old.safetensors", models, ["A", "B", "C"], "x", 8, 112.0, [1, 5])
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    doc = json.loads(header["__metadata__"]["he2rna"])
    assert not {"tile_px", "tile_magnification", "input_resize", "clustering"} & set(doc)
    bundle = load_bundle(path)
    assert (bundle.aggregation, bundle.tile_px, bundle.input_resize, bundle.clustering) == (
        "topk",
        None,
        True,
        None,
    )
    feats = _slide(30, 8, seed=6)
    np.testing.assert_array_equal(bundle.slide_inputs(feats), feats)
    tiles = torch.as_tensor(feats).T[None]
    with torch.no_grad():
        expected = torch.stack(
            [m.predict(tiles, torch.ones(1, 30, dtype=torch.bool), [1, 5])[0] for m in models]
        )
    np.testing.assert_allclose(bundle.slide_prediction(feats), expected.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match="magnification"):
        save_bundle(tmp_path / "x.safetensors", models, ["A", "B", "C"], "x", 8, 112.0, [1], tile_px=256)
    with pytest.raises(ModelError, match="k-means settings belong"):
        save_bundle(
            tmp_path / "x.safetensors",
            models,
            ["A", "B", "C"],
            "x",
            8,
            112.0,
            [1],
            clustering=aggregation.Clustering(),
        )


def test_gene_lists(tmp_path):
    assert read_gene_list(_gene_csv(tmp_path / "a.csv")) == GENES
    (tmp_path / "b.txt").write_text("# my genes\nESR1\n\nERBB2\n")
    assert read_gene_list(tmp_path / "b.txt") == ["ESR1", "ERBB2"]
    pd.DataFrame({"ensembl": ["ENSG1", "ENSG2"], "Symbol": ["ESR1", "ERBB2"]}).to_csv(
        tmp_path / "c.tsv", sep="\t", index=False
    )
    assert read_gene_list(tmp_path / "c.tsv") == ["ESR1", "ERBB2"]
    (tmp_path / "d.csv").write_text("id,name\n1,ESR1\n")
    with pytest.raises(ModelError, match="none named gene or symbol"):
        read_gene_list(tmp_path / "d.csv")
    (tmp_path / "e.csv").write_text("gene\nESR1\nESR1\n")
    with pytest.raises(ModelError, match="ESR1 twice"):
        read_gene_list(tmp_path / "e.csv")
    (tmp_path / "f.csv").write_text("gene\n")
    with pytest.raises(ModelError, match="names no gene"):
        read_gene_list(tmp_path / "f.csv")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_are_one_sentence_and_a_non_zero_exit(tmp_path, hub_cache, capsys, monkeypatch):
    folds = _five_folds(tmp_path / "w", "16-d")
    first = str(next(iter(folds)))
    out = tmp_path / "x.safetensors"
    genes = _gene_csv(tmp_path / "genes.csv")

    # a gene list one name short of the outputs: both numbers in one sentence
    short = _gene_csv(tmp_path / "short.csv", GENES[:-1])
    assert main(["convert", first, "--genes", str(short), "--out", str(out)]) == 2
    assert "predicts 7 outputs but 6 gene names were given (short.csv)" in _one_error_line(capsys)

    # a snapshot folder that is not there, and a folder without weights
    assert main(["convert", str(tmp_path / "nope"), "--genes", str(genes), "--out", str(out)]) == 2
    assert "does not exist" in _one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), "--genes", str(genes), "--out", str(out)]) == 2
    assert "No checkpoint files" in _one_error_line(capsys)

    # a config.json that describes another network than its tensors
    bad = tmp_path / "w" / "he2rna-brca-1" / "config.json"
    bad.write_text(json.dumps({**json.loads(bad.read_text()), "layers": [64, 64]}))
    assert main(["convert", str(tmp_path / "w"), "--genes", str(genes), "--out", str(out)]) == 2
    assert "he2rna-brca-1 says layers [64, 64] but its weights have [12, 12]" in _one_error_line(capsys)

    # tiles fed without resizing, but no size in pixels to feed them at
    args = ["--genes", str(genes), "--out", str(out), "--no-resize", "--aggregation", "topk"]
    assert main(["convert", first, *args]) == 2
    assert "give --tile-px and --magnification" in _one_error_line(capsys)

    # a hub id not in the cache, the hub offline
    assert main(["convert", "gevaertlab/he2rna-brca-0", "--genes", str(genes), "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "gevaertlab/he2rna-brca-0) is not in the Hugging Face cache" in line
    assert "in place of the hub id" in line and "--weights" not in line  # convert has no --weights

    # online, an id the hub does not know
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(*args, **kwargs):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(error, "404 Client Error: Repository Not Found")
        raise error

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    assert main(["convert", "gevaertlab/he2rna-nope-0", "--genes", str(genes), "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "gevaertlab/he2rna-nope-0 is not on the Hugging Face hub" in line and "--weights" not in line
    assert not out.exists()


def test_the_cli_knows_the_presets_of_the_converter():
    assert set(convert_cmd.PRESET_NAMES) == set(PRESETS) and convert_cmd.DEFAULT_UNIT == DEFAULT_UNIT
