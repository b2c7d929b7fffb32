"""Streaming all-tile training: batches read ahead in the background, stores checked once, and
``he2rna extract --scheduler`` on a dask.distributed LocalCluster."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import closing

import numpy as np
import pandas as pd
import pytest
import torch

from napari_he2rna.errors import DataError
from napari_he2rna.model import prefetch
from napari_he2rna.model.cohort_prediction import SlideBatches
from napari_he2rna.model.network import HE2RNA
from napari_he2rna.model.training import TrainConfig, train_one


def _features(n: int = 10, dim: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"s{i}": rng.normal(size=(int(rng.integers(3, 40)), dim)).astype(np.float32) for i in range(n)}


def test_read_ahead_gives_the_same_batches_in_order():
    feats = _features()
    slides = SlideBatches(feats, list(feats), keep_in_memory=False)
    batches = [[3, 1, 7, 0], [2, 9], [5, 6, 4, 8]]
    wanted = [slides.batch(b, torch.device("cpu")) for b in batches]
    for depth in (0, 1, 2, 5):
        stats: dict = {}
        with closing(prefetch.iter_batches(slides, batches, torch.device("cpu"), depth, stats)) as stream:
            got = list(stream)
        assert len(got) == len(wanted) and stats["wait_s"] >= 0
        for (x, m), (wx, wm) in zip(got, wanted, strict=True):
            assert torch.equal(x, wx) and torch.equal(m, wm)


def test_leaving_early_drops_the_queued_reads():
    feats = _features()
    slides = SlideBatches(feats, list(feats), keep_in_memory=False)
    stream = prefetch.iter_batches(slides, [[i] for i in range(10)], torch.device("cpu"), depth=3)
    next(stream)
    stream.close()  # no thread left behind, no error


def _train(slides: SlideBatches, depth: int, monkeypatch) -> dict[str, torch.Tensor]:
    monkeypatch.setattr(prefetch, "PREFETCH_DEPTH", depth)
    n = len(slides.ids)
    rng_y = np.random.default_rng(1)
    y = rng_y.normal(size=(n, 3)).astype(np.float32)
    types = np.array(["A", "B"] * (n // 2))
    torch.manual_seed(0)
    model = HE2RNA(8, 3, (16,), 0.25)
    config = TrainConfig(mode="tiles", hidden=(16,), max_epochs=3, batch_size=3, ks=(1, 2, 5), device="cpu")
    train_one(
        model, slides, y, types, np.arange(n - 2), np.arange(n - 2, n), config, torch.device("cpu"),
        np.random.default_rng(0),
    )  # fmt: skip
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_read_ahead_trains_the_same_weights(monkeypatch, one_torch_thread):
    feats = _features()
    plain = _train(SlideBatches(feats, list(feats), keep_in_memory=False), 0, monkeypatch)
    ahead = _train(SlideBatches(feats, list(feats), keep_in_memory=False), 2, monkeypatch)
    assert plain.keys() == ahead.keys()
    for k in plain:
        assert torch.equal(plain[k], ahead[k]), k


class _Swapping(Mapping):
    """Gives a sample's matrix, then a NaN one: a second read is not checked value by value again."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr, self.reads = arr, 0

    def __getitem__(self, key: str) -> np.ndarray:
        self.reads += 1
        return self.arr if self.reads == 1 else np.full_like(self.arr, np.nan)

    def __iter__(self) -> Iterator[str]:
        return iter(["a"])

    def __len__(self) -> int:
        return 1


def test_values_are_checked_on_the_first_read_only():
    bad = SlideBatches({"a": np.full((3, 2), np.nan, np.float32)}, ["a"], keep_in_memory=False)
    with pytest.raises(DataError, match="NaN"):
        bad.get(0)
    swapping = _Swapping(np.ones((3, 2), np.float32))
    slides = SlideBatches(swapping, ["a"], keep_in_memory=False)
    slides.get(0)
    slides.get(0)  # read again (all-tile mode keeps nothing), not checked again
    assert swapping.reads == 2


@pytest.fixture(scope="module")
def small_slides(tmp_path_factory):
    from napari_he2rna.synthetic.cohort import make_slide

    folder = tmp_path_factory.mktemp("slides")
    for i in range(3):
        make_slide(folder / f"s{i}.tiff", seed=i, size_px=(672, 672), write_truth=False)
    return sorted(folder.glob("*.tiff"))


def test_each_store_is_checked_once_when_opened(small_slides, tmp_path, monkeypatch):
    from napari_he2rna.cohorts.cohort import cohort_features
    from napari_he2rna.features import cache

    samples = pd.DataFrame({"slide": [str(s) for s in small_slides]}, index=[s.stem for s in small_slides])
    cohort_features(samples, "hed-stats", cache_dir=tmp_path, supertiles=False, device="cpu")  # extract
    calls = {"read_cache": 0, "verify": 0, "read_features": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(cache, "read_cache", spy("read_cache", cache.read_cache))
    monkeypatch.setattr(cache, "_verify_checksums", spy("verify", cache._verify_checksums))
    monkeypatch.setattr(cache, "read_features", spy("read_features", cache.read_features))
    feats, failed = cohort_features(samples, "hed-stats", cache_dir=tmp_path, supertiles=False, device="cpu")
    assert not failed
    opened = dict(calls)
    assert opened["read_cache"] == len(samples) and opened["read_features"] == 0
    slides = SlideBatches(feats, list(feats), keep_in_memory=False)
    first = [slides.get(i).copy() for i in range(len(samples))]
    for _epoch in range(3):
        with closing(prefetch.iter_batches(slides, [[0, 1], [2]], torch.device("cpu"))) as stream:
            list(stream)
    assert calls["read_cache"] == opened["read_cache"] and calls["verify"] == opened["verify"]
    assert calls["read_features"] == 4 * len(samples)
    for i, sid in enumerate(feats):
        np.testing.assert_array_equal(first[i], cache.read_cache(cache_path_of(tmp_path, sid))[1])


def cache_path_of(folder, stem):
    (store,) = [p for p in folder.glob("*.zarr") if p.name.startswith(stem + "-")]
    return store


def test_extract_on_a_local_cluster_equals_a_local_run(small_slides, tmp_path, cli_in_process):
    from distributed import LocalCluster

    from napari_he2rna.features.cache import read_cache

    args = ["extract", *small_slides, "--backbone", "hed-stats", "--max-tiles", "6", "--device", "cpu"]
    local = cli_in_process(*args, "--cache-dir", tmp_path / "local")
    assert local.returncode == 0, local.stderr
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        remote = cli_in_process(*args, "--cache-dir", tmp_path / "cluster", "--scheduler", address)
    assert remote.returncode == 0, remote.stderr
    stores = sorted(p.name for p in (tmp_path / "local").glob("*.zarr"))
    assert len(stores) == len(small_slides)
    assert stores == sorted(p.name for p in (tmp_path / "cluster").glob("*.zarr"))
    for name in stores:
        ga, fa, _ = read_cache(tmp_path / "local" / name)
        gb, fb, _ = read_cache(tmp_path / "cluster" / name)
        assert ga.table.equals(gb.table)
        np.testing.assert_allclose(fa, fb, rtol=1e-6)
