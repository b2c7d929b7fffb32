"""Backbones, extraction pipeline, zarr cache (round trip, resume, corruption), supertiles, cohorts."""

from __future__ import annotations

import glob
import json
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from torch import nn

from napari_he2rna import __version__, settings
from napari_he2rna.cli import main
from napari_he2rna.errors import Cancelled, He2rnaError, WeightsError
from napari_he2rna.features.backbones import Backbone, get_backbone
from napari_he2rna.features.cache import cache_path, load_or_extract, read_cache, read_supertiles
from napari_he2rna.features.cohort_tasks import extract_cohort
from napari_he2rna.features.extraction import extract_features, supertiles
from napari_he2rna.features.hed_stats import HED_STATS_FEATURES
from napari_he2rna.features.resnet import RESNET50_FILE, RESNET50_URL, file_hash
from napari_he2rna.slides.slide import open_slide
from napari_he2rna.slides.tiling import read_tile, tile_grid


class CountingBackbone(Backbone):
    """A tiny network that counts the tiles it sees (to check what a cached or resumed run computes)."""

    name = "tiny-test"
    dim = 6
    input_px = 224

    def __init__(self, weights_hash: str = "tiny-v1", fail_above: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, self.dim, kernel_size=8, stride=8)
        self.weights_hash = weights_hash
        self.seen = 0
        self.fail_above = fail_above  # simulate out-of-memory for batches larger than this

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_above is not None and x.shape[0] > self.fail_above:
            raise torch.OutOfMemoryError("simulated out of memory")
        self.seen += x.shape[0]
        return self.conv(x).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def cmu(cmu_slide):
    with open_slide(cmu_slide) as slide:
        yield slide


@pytest.fixture(scope="module")
def small_grid(cmu):
    return tile_grid(cmu, max_tiles=3, seed=0)


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """A seeded random ResNet50 state dict saved locally: weights are never downloaded in tests."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet50-test.pth"
    torch.save(resnet50().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def resnet(resnet_weights):
    return get_backbone("resnet50-imagenet", weights=resnet_weights, device="cpu")


def _one_by_one(slide, grid, backbone) -> np.ndarray:
    rows = []
    with torch.inference_mode():
        for i in range(len(grid.table)):
            rows.append(backbone(backbone.preprocess(read_tile(slide, grid, i)[None])).numpy())
    return np.concatenate(rows)


# ------------------------------------------------------------------------------------------------ backbones
def test_resnet50_pipeline_equals_a_one_tile_loop(cmu, small_grid, resnet, resnet_weights):
    backbone = resnet
    assert (backbone.dim, backbone.input_px) == (2048, 224)
    assert backbone.weights_hash == file_hash(resnet_weights) and len(backbone.weights_hash) == 64
    seen = []
    feats = extract_features(
        cmu,
        small_grid,
        backbone,
        batch_size=2,
        precision="fp32",
        progress=lambda d, t, m: seen.append((d, t, m)),
    )
    assert feats.shape == (3, 2048) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, _one_by_one(cmu, small_grid, backbone), rtol=1e-4, atol=1e-4)
    assert seen[-1][:2] == (3, 3) and "tiles/s" in seen[-1][2]
    assert [d for d, _, _ in seen] == [2, 3]


def test_resnet50_built_on_the_meta_device_is_torchvisions_network(resnet_weights, cmu, small_grid):
    """Our ResNet50 is built empty and given the file's tensors: it must be torchvision's own network, also
    for files written before BatchNorm counted its batches (no ``num_batches_tracked``) and fp16 files."""
    from torchvision.models import resnet50

    from napari_he2rna.features.resnet import ResNet50Backbone

    state = torch.load(resnet_weights, weights_only=True)
    reference = resnet50()
    reference.load_state_dict(state)
    reference.fc = torch.nn.Identity()
    reference.eval()
    x = ResNet50Backbone(state, "x").preprocess(read_tile(cmu, small_grid, 0)[None])
    with torch.inference_mode():
        expected = reference(x).numpy()
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    for variant, tol in ((state, 1e-6), (old, 1e-6), (half, 2e-2)):
        ours = ResNet50Backbone(variant, "x").eval()
        tensors = [*ours.parameters(), *ours.buffers()]
        assert not any(t.is_meta for t in tensors) and all(t.dtype != torch.float16 for t in tensors)
        with torch.inference_mode():
            np.testing.assert_allclose(ours(x).numpy(), expected, rtol=tol, atol=tol)


def test_safetensors_weights_give_the_same_network(tmp_path, resnet_weights, resnet, cmu, small_grid):
    from safetensors.torch import save_file

    state = torch.load(resnet_weights, weights_only=True)
    st = tmp_path / "r50.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("fc.")}, str(st))
    a = resnet
    b = get_backbone("resnet50-imagenet", weights=st, device="cpu")
    x = b.preprocess(read_tile(cmu, small_grid, 0)[None])
    with torch.inference_mode():
        np.testing.assert_allclose(a(x).numpy(), b(x).numpy(), rtol=1e-5, atol=1e-6)


def test_missing_weights_name_the_file_to_download(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="nope.pth"):
        get_backbone("resnet50-imagenet", weights=tmp_path / "nope.pth")
    monkeypatch.setenv("HE2RNA_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as info:
        get_backbone("resnet50-imagenet", download=False)
    message = str(info.value)
    assert RESNET50_FILE in message and RESNET50_URL in message and str(tmp_path / "weights") in message
    with pytest.raises(WeightsError, match="unknown backbone"):
        get_backbone("resnet51")


def test_weights_that_do_not_fit_or_are_unsafe_are_refused(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save(nn.Linear(3, 2).state_dict(), wrong)
    with pytest.raises(WeightsError, match="does not fit"):
        get_backbone("resnet50-imagenet", weights=wrong)
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "obj": threading.Lock}, pickled)  # not plain tensors
    with pytest.raises(WeightsError, match="cannot load"):
        get_backbone("resnet50-imagenet", weights=pickled)


def test_foundation_models_are_registered_with_their_dims(monkeypatch, tmp_path):
    from napari_he2rna.features.backbones import BACKBONES

    assert {n: BACKBONES[n].dim for n in BACKBONES if BACKBONES[n].hub is not None} == {
        "uni": 1024,
        "uni2-h": 1536,
        "h-optimus-0": 1536,
        "h-optimus-1": 1536,
        "virchow2": 2560,  # class token + mean patch token
        "phikon": 768,
        "phikon-v2": 1024,
    }
    monkeypatch.setenv("HE2RNA_OFFLINE", "1")  # never the network in a test
    monkeypatch.setenv("HE2RNA_WEIGHTS", str(tmp_path / "weights"))
    # WeightsError (not cached) or MissingExtraError (no timm): one sentence either way; more in
    # tests/test_foundation.py
    with pytest.raises(He2rnaError, match="uni"):
        get_backbone("uni")


def test_hed_stats_separate_tissue_classes(shared_data):
    tiles = {
        p.split("/")[-1][:3]: np.asarray(Image.open(p).convert("RGB"))
        for p in sorted(glob.glob(str(shared_data / "tiles" / "nct-crc-he-100k" / "*.tif")))
    }
    backbone = get_backbone("hed-stats")
    assert backbone.dim == len(HED_STATS_FEATURES) >= 24 and backbone.weights_hash
    with torch.inference_mode():
        f = backbone(backbone.preprocess(np.stack(list(tiles.values())))).numpy()
    assert np.isfinite(f).all()
    feat = {name: dict(zip(tiles, f[:, j], strict=True)) for j, name in enumerate(HED_STATS_FEATURES)}
    tissue = ["LYM", "STR", "MUS", "TUM", "NOR", "DEB"]
    # Lymphocytes: the most small dark nuclei, packed.
    for name in ("blobs_s_dark", "h_frac_2.0", "dark_density_mean"):
        assert max(feat[name], key=feat[name].get) == "LYM", name
    # Fat and background are white, tissue is not.
    assert min(feat["white_fraction"][k] for k in ("ADI", "BAC")) > 0.5
    assert max(feat["white_fraction"][k] for k in tissue if k != "TUM") < 0.1  # this TUM tile has lumens
    # Pink stroma and muscle: eosin over haematoxylin well above lymphocytes and normal mucosa.
    assert min(feat["e_over_h"]["STR"], feat["e_over_h"]["MUS"]) > 2 * max(
        feat["e_over_h"]["LYM"], feat["e_over_h"]["NOR"]
    )
    # Epithelium (tumour): many nuclei, but far fewer dark ones than lymphocytes.
    assert feat["blobs_s_moderate"]["TUM"] > 3 * feat["blobs_s_moderate"]["ADI"]
    assert feat["blobs_s_dark"]["TUM"] < 0.2 * feat["blobs_s_dark"]["LYM"]


def test_oom_halves_the_batch_and_gives_the_same_features(cmu, small_grid):
    reference = extract_features(cmu, small_grid, CountingBackbone(), batch_size=4)
    flaky = CountingBackbone(fail_above=1)
    with pytest.warns(UserWarning, match="batch size lowered"):
        feats = extract_features(cmu, small_grid, flaky, batch_size=4)
    np.testing.assert_allclose(feats, reference, rtol=1e-6, atol=1e-6)
    assert flaky.seen == 3


def test_cpu_bf16_is_close_to_fp32(cmu, small_grid):
    net = CountingBackbone()
    fp32 = extract_features(cmu, small_grid, net, precision="fp32")
    bf16 = extract_features(cmu, small_grid, net, precision="bf16")
    assert not np.array_equal(fp32, bf16)  # autocast did something
    np.testing.assert_allclose(bf16, fp32, rtol=0.05, atol=0.05)


def test_resnet50_bf16_features_match_fp32_on_the_sample_slide(resnet_weights):
    """Whatever --precision auto picks on a machine, the features stay those of fp32 (cosine >= 0.999)."""
    net = get_backbone("resnet50-imagenet", weights=resnet_weights, device="cpu")
    with open_slide(settings.sample_data_dir() / "sample_slide.tiff") as slide:
        grid = tile_grid(slide, max_tiles=6, seed=0)
        fp32 = extract_features(slide, grid, net, batch_size=6, precision="fp32")
        bf16 = extract_features(slide, grid, net, batch_size=6, precision="bf16")
    assert not np.array_equal(fp32, bf16)  # bf16 autocast really ran
    cosine = (fp32 * bf16).sum(axis=1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cosine.min() >= 0.999, f"per-tile cosine similarity down to {cosine.min():.5f}"


def test_auto_precision_follows_the_cpu(tmp_path, monkeypatch):
    from napari_he2rna.features import precision

    def never():
        raise AssertionError("measured although the flags decide")

    assert precision.cpu_prefers_bf16(tmp_path / "p.json", never, lambda: {"avx2", "amx_bf16"}) is True
    assert precision.cpu_prefers_bf16(tmp_path / "p.json", never, lambda: {"avx2", "avx512_bf16"}) is True
    assert precision.cpu_prefers_bf16(tmp_path / "p.json", never, lambda: {"avx2", "avx512f"}) is False
    # flags unknown (not Linux): timed once per machine, then read from the cache file
    calls = []

    def slow_bf16():
        calls.append(1)
        return {"fp32_s": 1.0, "bf16_s": 4.0, "speedup": 0.25}

    cache = tmp_path / "cpu-precision.json"
    assert precision.cpu_prefers_bf16(cache, slow_bf16, lambda: None) is False
    precision._memo.clear()  # a new process
    assert precision.cpu_prefers_bf16(cache, never, lambda: None) is False
    assert calls == [1] and json.loads(cache.read_text())
    cpu = torch.device("cpu")
    for has_bf16, want in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(precision, "cpu_prefers_bf16", lambda h=has_bf16: h)
        assert precision.resolve_precision("auto", cpu) is want
        assert precision.resolve_precision("fp32", cpu) is None
    assert precision.measure_bf16_speedup(repeats=1)["speedup"] > 0


def test_cache_records_precision_and_is_not_reused_across_it(cmu, tmp_path):
    net = CountingBackbone()
    load_or_extract(cmu, net, cache_dir=tmp_path, max_tiles=2, batch_size=8, precision="fp32")
    _, _, attrs = read_cache(cache_path(cmu, net, 112.0, tmp_path))
    assert attrs["precision"] == "fp32"
    seen = net.seen
    load_or_extract(cmu, net, cache_dir=tmp_path, max_tiles=2, batch_size=8, precision="fp32")
    assert net.seen == seen  # same precision: read from the cache
    with pytest.warns(UserWarning, match="precision is 'fp32', expected 'bf16'"):
        load_or_extract(cmu, net, cache_dir=tmp_path, max_tiles=2, batch_size=8, precision="bf16")
    assert net.seen == seen + 2
    assert read_cache(cache_path(cmu, net, 112.0, tmp_path))[2]["precision"] == "bf16"


def test_cancel_stops_cleanly(cmu, small_grid):
    stop = threading.Event()
    net = CountingBackbone()

    def progress(done, total, message):
        stop.set()

    with pytest.raises(Cancelled):
        extract_features(cmu, small_grid, net, batch_size=2, progress=progress, cancel=stop)
    assert net.seen == 2  # the batch in flight finished, no more


# ------------------------------------------------------------------------------------------------ cache
def test_cache_round_trip(cmu, tmp_path):
    net = CountingBackbone()
    grid, feats = load_or_extract(cmu, net, cache_dir=tmp_path, max_tiles=None, batch_size=8)
    n = len(grid.table)
    assert net.seen == n and feats.shape == (n, net.dim)
    store = cache_path(cmu, net, 112.0, tmp_path)
    assert store.is_dir() and not store.with_name(store.name + ".partial").exists()
    attrs = dict(zarr.open_group(str(store), mode="r").attrs)
    assert attrs["slide_fingerprint"] == cmu.fingerprint() and attrs["backbone"] == "tiny-test"
    assert attrs["weights_hash"] == "tiny-v1" and attrs["tile_um"] == 112.0 and attrs["complete"] is True
    assert attrs["mpp"] == pytest.approx(0.499) and attrs["library_version"] == __version__
    grid2, feats2 = load_or_extract(cmu, net, cache_dir=tmp_path, max_tiles=None, batch_size=8)
    assert net.seen == n  # nothing recomputed
    np.testing.assert_array_equal(feats2, feats)
    assert grid2.table.equals(grid.table) and (grid2.tile_px, grid2.n_cols) == (grid.tile_px, grid.n_cols)
    np.testing.assert_allclose(feats, extract_features(cmu, grid, CountingBackbone()), rtol=1e-6)
    centroids, labels = read_supertiles(store)
    assert labels.shape == (n,) and centroids.shape == (min(100, n), net.dim)


def test_default_cache_is_the_settings_folder(cmu):
    net = CountingBackbone(weights_hash="default-dir")
    load_or_extract(cmu, net, max_tiles=3)
    assert cache_path(cmu, net).parent == settings.cache_dir() and cache_path(cmu, net).is_dir()


def test_interrupted_run_resumes_from_the_done_rows(cmu, tmp_path):
    stop = threading.Event()
    net = CountingBackbone()

    def progress(done, total, message):
        if done >= 16:
            stop.set()

    with pytest.raises(Cancelled):
        load_or_extract(
            cmu, net, cache_dir=tmp_path, max_tiles=24, batch_size=8, progress=progress, cancel=stop
        )
    store = cache_path(cmu, net, 112.0, tmp_path)
    partial = store.with_name(store.name + ".partial")
    assert not store.exists() and partial.is_dir()
    first = net.seen
    assert first == 16
    again = CountingBackbone()
    grid, feats = load_or_extract(cmu, again, cache_dir=tmp_path, max_tiles=24, batch_size=8)
    assert again.seen == len(grid.table) - first  # only the rest
    assert store.is_dir() and not partial.exists()
    np.testing.assert_allclose(feats, extract_features(cmu, grid, CountingBackbone()), rtol=1e-6)


def test_corrupt_cache_is_detected_and_redone(cmu, tmp_path):
    net = CountingBackbone()
    grid, feats = load_or_extract(cmu, net, cache_dir=tmp_path, max_tiles=12, batch_size=8)
    store = cache_path(cmu, net, 112.0, tmp_path)
    for chunk in (store / "features" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()  # lost chunks read back as NaN, never as plausible numbers
            break
    with pytest.warns(UserWarning, match="changed on disk"):  # its checksum says so
        _, redone = load_or_extract(cmu, net, cache_dir=tmp_path, max_tiles=12, batch_size=8)
    assert net.seen == 2 * len(grid.table)
    np.testing.assert_array_equal(redone, feats)
    (store / "zarr.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        load_or_extract(cmu, net, cache_dir=tmp_path, max_tiles=12, batch_size=8)
    assert net.seen == 3 * len(grid.table)
    read_cache(store)  # sound again


def test_stale_cache_is_redone(cmu, tmp_path):
    load_or_extract(cmu, CountingBackbone(), cache_dir=tmp_path, max_tiles=4)
    other = CountingBackbone(weights_hash="tiny-v2")
    with pytest.warns(UserWarning, match="stale.*weights_hash"):
        load_or_extract(cmu, other, cache_dir=tmp_path, max_tiles=4)
    assert other.seen == 4
    attrs = json.loads((cache_path(cmu, other, 112.0, tmp_path) / "zarr.json").read_text())["attributes"]
    assert attrs["weights_hash"] == "tiny-v2"


def test_supertiles_average_features_of_nearby_tiles(cmu):
    grid = tile_grid(cmu, max_tiles=None)
    feats = np.random.default_rng(0).normal(size=(len(grid.table), 3)).astype(np.float32)
    centroids, labels = supertiles(grid, feats, k=5, seed=0)
    assert centroids.shape == (5, 3) and labels.shape == (len(grid.table),)
    for c in range(5):
        np.testing.assert_allclose(centroids[c], feats[labels == c].mean(0), rtol=1e-5, atol=1e-6)
        xy = grid.centers()[labels == c]
        assert np.ptp(xy[:, 1]) < 0.6 * np.ptp(grid.centers()[:, 1]) + grid.tile_px  # clusters are compact
    again, labels2 = supertiles(grid, feats, k=5, seed=0)
    np.testing.assert_array_equal(labels, labels2)
    few, lab = supertiles(grid, feats, k=10_000)
    assert few.shape == (len(grid.table), 3) and (lab == np.arange(len(grid.table))).all()


# ------------------------------------------------------------------------------------------------ cohorts
def _slide_folder(tmp_path, cmu_slide):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "cmu.svs").symlink_to(cmu_slide)
    shutil.copy(settings.sample_data_dir() / "sample_slide.tiff", folder / "sample.tiff") if (
        settings.sample_data_dir() / "sample_slide.tiff"
    ).is_file() else None
    (folder / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 100)
    (folder / "notes.txt").write_text("not a slide")
    return folder


def test_local_cluster_equals_local_run(cmu_slide, tmp_path):
    from distributed import Client, LocalCluster

    slides = [cmu_slide, settings.sample_data_dir() / "sample_slide.tiff"]
    slides = [s for s in slides if s.is_file()]
    local = extract_cohort(slides, "hed-stats", out_dir=tmp_path / "local", max_tiles=6)
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        remote = extract_cohort(
            slides, "hed-stats", out_dir=tmp_path / "cluster", scheduler=client, max_tiles=6
        )
    assert [r["status"] for r in local] == [r["status"] for r in remote] == ["ok"] * len(slides)
    for a, b in zip(local, remote, strict=True):
        ga, fa, _ = read_cache(a["store"])
        gb, fb, _ = read_cache(b["store"])
        assert ga.table.equals(gb.table)
        np.testing.assert_allclose(fa, fb, rtol=1e-6)


def test_cli_reports_a_bad_slide_and_processes_the_others(cmu_slide, tmp_path, capsys):
    folder = _slide_folder(tmp_path, cmu_slide)
    out = tmp_path / "features"
    argv = ["extract", str(folder), "--out", str(out), "--backbone", "hed-stats", "--max-tiles", "4"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "broken.svs" in captured.err and "failed" in captured.err
    assert "notes.txt" not in captured.out + captured.err
    assert "cmu.svs" in captured.out and "ok" in captured.out
    stores = sorted(p.name for p in out.glob("*.zarr"))
    assert any(s.startswith("cmu-") for s in stores)
    # Second run: what was done is cached; the manifest form names the same slides.
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("slide,label\nslides/cmu.svs,1\n")
    assert (
        main(["extract", str(manifest), "--out", str(out), "--backbone", "hed-stats", "--max-tiles", "4"])
        == 0
    )
    assert "cached" in capsys.readouterr().out


def test_cli_missing_weights_is_one_clear_error(cmu_slide, tmp_path, capsys):
    code = main(["extract", str(cmu_slide), "--out", str(tmp_path), "--weights", str(tmp_path / "r50.pth")])
    assert code == 2
    assert "r50.pth" in capsys.readouterr().err


def test_extract_cohort_never_raises_for_a_bad_slide(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = extract_cohort([tmp_path / "missing.svs"], "hed-stats", out_dir=tmp_path)
    assert res[0]["status"] == "failed" and "missing.svs" in res[0]["reason"]
