"""Feature stores written in float16: recorded, read back as float32, never confused with float32 ones, never
holding inf, and training on them gives the per-gene R of float32 stores (within 0.01)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_he2rna.errors import CacheError, CacheWarning, DataError
from napari_he2rna.features import cache
from napari_he2rna.features.extraction import ExtractOptions
from napari_he2rna.features.store_dtype import FLOAT16_MAX, to_store
from napari_he2rna.slides.slide import open_slide


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The walkthrough's cohort, smaller: 24 slides of 1024 px, two cancer types."""
    from napari_he2rna.synthetic.cohort import make_cohort

    root = tmp_path_factory.mktemp("f16-cohort")
    make_cohort(root, n_slides=24, seed=3, size_px=(1024, 1024), cancer_types=["SYN-BRCA", "SYN-COAD"])
    return root


@pytest.fixture(scope="module")
def slide_path(cohort):
    return cohort / "SYN-0000.tiff"


def _zarr_features(store):
    import zarr

    group = zarr.open_group(str(store), mode="r")
    return group["features"], dict(group.attrs)


def _extract(slide_path, folder, **options):
    with open_slide(slide_path) as slide:
        grid, feats = cache.load_or_extract(slide, "hed-stats", cache_dir=folder, device="cpu", **options)
        return grid, feats, cache.cache_path(slide, "hed-stats", cache_dir=folder)


def test_a_float16_store_records_its_dtype_and_every_reader_returns_float32(slide_path, tmp_path):
    _, f32, store32 = _extract(slide_path, tmp_path / "a", dtype="float32")
    _, f16, store16 = _extract(slide_path, tmp_path / "b", dtype="float16")
    array, attrs = _zarr_features(store16)
    assert array.dtype == np.float16 and attrs["dtype"] == "float16"
    assert _zarr_features(store32)[0].dtype == np.float32 and _zarr_features(store32)[1]["dtype"] == "float32"
    # what extraction returns, read_cache and read_features all give the float32 values of the float16 ones
    expected = f32.astype(np.float16).astype(np.float32)
    assert f16.dtype == np.float32
    np.testing.assert_array_equal(f16, expected)
    _, read, _ = cache.read_cache(store16)
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, expected)
    again = cache.read_features(store16, read.shape)
    assert again.dtype == np.float32
    np.testing.assert_array_equal(again, expected)
    centroids, _ = cache.read_supertiles(store16)
    assert centroids.dtype == np.float32  # supertile centroids stay float32
    assert not np.array_equal(f16, f32)  # float16 did round them: the checks above are not vacuous
    np.testing.assert_allclose(f16, f32, rtol=1e-3, atol=1e-6)


def test_a_changed_float16_store_is_caught_by_its_checksum(slide_path, tmp_path):
    import zarr

    _, _, store = _extract(slide_path, tmp_path, dtype="float16")
    features = zarr.open_group(str(store), mode="r+")["features"]
    features[0] = (np.asarray(features[0]) + np.float16(1)).astype(np.float16)
    with pytest.raises(CacheError, match="changed on disk"):
        cache.read_cache(store)


def test_a_store_whose_dtype_attribute_lies_is_refused(slide_path, tmp_path):
    import zarr

    _, _, store = _extract(slide_path, tmp_path, dtype="float16")
    zarr.open_group(str(store), mode="r+").attrs["dtype"] = "float32"
    with pytest.raises(CacheError, match="holds float16 features but says float32"):
        cache.read_cache(store)


def test_asking_no_dtype_reuses_either_and_asking_one_re_extracts_the_other(slide_path, tmp_path):
    _extract(slide_path, tmp_path, dtype="float16")
    from napari_he2rna.features.backbones import get_backbone

    with open_slide(slide_path) as slide:
        backbone = get_backbone("hed-stats", device="cpu")
        assert cache.is_cached(slide, backbone, cache_dir=tmp_path)  # no dtype asked: the float16 one serves
        assert cache.is_cached(slide, backbone, cache_dir=tmp_path, dtype="float16")
        assert not cache.is_cached(slide, backbone, cache_dir=tmp_path, dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reused as it is: no stale-store warning
        _, feats, store = _extract(slide_path, tmp_path)
    assert _zarr_features(store)[0].dtype == np.float16 and feats.dtype == np.float32
    with pytest.warns(
        CacheWarning, match=r"stale \(its features are float16, float32 were asked\); recomputing"
    ):
        _extract(slide_path, tmp_path, dtype="float32")
    assert _zarr_features(store)[0].dtype == np.float32
    assert [p.name for p in tmp_path.glob("*.zarr")] == [store.name]  # one store per slide
    assert not list(tmp_path.glob("*.partial"))


def test_a_new_store_is_float32_when_no_dtype_is_asked(slide_path, tmp_path):
    _, _, store = _extract(slide_path, tmp_path)
    array, attrs = _zarr_features(store)
    assert array.dtype == np.float32 and attrs["dtype"] == "float32"


def _interrupted_float16(slide_path, folder):
    """A float16 store stopped after its first batch: its ``.partial``."""
    import threading

    from napari_he2rna.errors import Cancelled

    token = threading.Event()
    with open_slide(slide_path) as slide, pytest.raises(Cancelled):
        cache.load_or_extract(
            slide, "hed-stats", cache_dir=folder, device="cpu", dtype="float16", batch_size=4,
            cancel=token, batch_ready=lambda rows, feats: token.set(),
        )  # fmt: skip
    (partial,) = folder.glob("*.zarr.partial")
    assert _zarr_features(partial)[0].dtype == np.float16
    return partial


def test_a_partial_float16_store_is_resumed_in_float16_unless_float32_is_asked(slide_path, tmp_path):
    _interrupted_float16(slide_path, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resumed, not discarded
        _, _, store = _extract(slide_path, tmp_path / "a", batch_size=4)  # no dtype asked: as it was begun
    assert _zarr_features(store)[0].dtype == np.float16
    _interrupted_float16(slide_path, tmp_path / "b")
    with pytest.warns(CacheWarning, match="discarding the unfinished .* float16, float32 were asked"):
        _, _, store = _extract(slide_path, tmp_path / "b", batch_size=4, dtype="float32")
    assert _zarr_features(store)[0].dtype == np.float32


def test_options_accept_the_two_dtypes_only():
    assert ExtractOptions(dtype=np.float16).dtype == "float16"
    assert ExtractOptions().dtype is None
    with pytest.raises(DataError, match="float32 or float16, not 'int8'"):
        ExtractOptions(dtype="int8")


def test_values_beyond_float16_range_are_refused_never_stored_as_inf():
    edge = np.array([[FLOAT16_MAX, -FLOAT16_MAX, np.nan]], dtype=np.float32)
    assert np.isfinite(to_store(edge, "float16", "b", "s.tiff")[:, :2]).all()
    big = np.array([[1.0, -70000.0]], dtype=np.float32)
    with pytest.raises(CacheError, match=r"^The backbone big-net gives features up to 7e\+04 on s\.tiff"):
        to_store(big, "float16", "big-net", "s.tiff")
    assert to_store(big, "float32", "big-net", "s.tiff").dtype == np.float32


@pytest.fixture
def huge_backbone(monkeypatch):
    """hed-stats, but its features times 1e6 (beyond float16's range)."""
    real = cache.iter_features

    def scaled(*args, **kwargs):
        for rows, feats in real(*args, **kwargs):
            yield rows, feats * 1e6

    monkeypatch.setattr(cache, "iter_features", scaled)


def test_a_float16_extraction_beyond_its_range_is_refused_naming_the_backbone(
    slide_path, tmp_path, huge_backbone
):
    with pytest.raises(CacheError, match="The backbone hed-stats gives features up to .* on SYN-0000.tiff"):
        _extract(slide_path, tmp_path, dtype="float16")
    assert not list(tmp_path.glob("*.zarr"))  # nothing complete
    for partial in tmp_path.glob("*.zarr.partial"):  # and nothing written as inf
        values = np.asarray(_zarr_features(partial)[0][:], dtype=np.float32)
        assert not np.isinf(values).any()
    with pytest.warns(CacheWarning, match="discarding the unfinished"):  # the float16 rows done before
        _, feats, store = _extract(slide_path, tmp_path, dtype="float32")  # as the sentence says: float32
    assert np.abs(feats).max() > FLOAT16_MAX and _zarr_features(store)[0].dtype == np.float32


def test_the_cli_refuses_a_slide_beyond_float16_range_in_one_sentence(
    slide_path, tmp_path, huge_backbone, cli_in_process
):
    args = ["extract", slide_path, "--backbone", "hed-stats", "--device", "cpu", "--cache-dir", tmp_path]
    proc = cli_in_process(*args, "--dtype", "float16")
    assert proc.returncode == 1
    assert "The backbone hed-stats gives features up to" in proc.stderr and "--dtype float32" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_cli_option_and_a_dask_cluster_pass_the_dtype_through(cohort, tmp_path, cli_in_process):
    from distributed import LocalCluster

    slides = [cohort / "SYN-0001.tiff", cohort / "SYN-0002.tiff"]
    base = ["extract", *slides, "--backbone", "hed-stats", "--max-tiles", "6", "--device", "cpu"]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        proc = cli_in_process(
            *base, "--cache-dir", tmp_path, "--dtype", "float16", "--scheduler", cluster.scheduler_address
        )
    assert proc.returncode == 0, proc.stderr
    stores = sorted(tmp_path.glob("*.zarr"))
    assert len(stores) == 2 and all(_zarr_features(s)[0].dtype == np.float16 for s in stores)
    again = cli_in_process(*base, "--cache-dir", tmp_path)  # no dtype asked: they are cached
    assert again.returncode == 0 and again.stdout.count("cached") == 2, again.stdout
    back = cli_in_process(*base, "--cache-dir", tmp_path, "--dtype", "float32")  # asked: re-extracted
    assert back.returncode == 0 and back.stdout.count("    ok") == 2, back.stdout
    assert all(_zarr_features(s)[0].dtype == np.float32 for s in stores)
    bad = cli_in_process(*base, "--cache-dir", tmp_path, "--dtype", "int8")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.slow
def test_training_on_float16_stores_gives_the_per_gene_r_of_float32_stores(cohort, cli_in_process):
    """The walkthrough's steps (hed-stats, --supertiles --hidden 256 256, seeded) from float32 and from
    float16 stores: every gene's out-of-fold R within 0.01."""
    import torch

    from napari_he2rna.cohorts.cohort import cohort_features, load_expression, load_samples, match_cohort
    from napari_he2rna.model.evaluation import pearson_columns
    from napari_he2rna.model.training import TrainConfig, cross_validate

    samples = load_samples(cohort / "samples.tsv")
    expression = load_expression(cohort / "expression.tsv")
    r, supertiles = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in both runs, and no fight over a shared machine
    try:
        for dtype in ("float32", "float16"):
            folder = cohort / f"features-{dtype}"
            args = ["extract", cohort / "samples.tsv", "--backbone", "hed-stats", "--device", "cpu"]
            proc = cli_in_process(*args, "--cache-dir", folder, "--dtype", dtype)
            assert proc.returncode == 0, proc.stderr
            feats, failed = cohort_features(samples, "hed-stats", cache_dir=folder, device="cpu")
            assert not failed
            matched, _ = match_cohort(expression, samples, feats)
            supertiles[dtype] = np.concatenate([matched.features[s] for s in matched.sample_ids])
            result = cross_validate(
                matched,
                TrainConfig(mode="supertiles", hidden=(256, 256), max_epochs=30, seed=0, device="cpu"),
            )
            truth = matched.expression.loc[result.sample_ids].to_numpy()
            r[dtype] = dict(zip(result.genes, pearson_columns(truth, result.oof.to_numpy()), strict=True))
    finally:
        torch.set_num_threads(threads)
    assert not np.array_equal(supertiles["float32"], supertiles["float16"])  # the inputs did differ
    assert min(r["float32"]["CD3E"], r["float32"]["CD2"]) > 0.4  # planted T-cell genes are learnt
    assert r["float32"].keys() == r["float16"].keys()
    diff = {g: abs(r["float32"][g] - r["float16"][g]) for g in r["float32"]}
    worst = max(diff, key=diff.get)
    assert diff[worst] < 0.01, f"{worst}: R {r['float32'][worst]:.4f} from float32, {r['float16'][worst]:.4f}"
