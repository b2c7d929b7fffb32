"""``benchmarks/gpu_check.sh --cpu-smoke``: the GPU check runs end to end on the CPU at tiny sizes and writes
one JSON with every figure the GPU run reports. Values are checked for sense (positive rates, cosines in
[-1, 1], the CPU matching itself); timings are never asserted. No GPU is needed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    pytest.importorskip("timm")
    out = tmp_path_factory.mktemp("gpu-check") / "check.json"
    env = {
        **os.environ,
        "HE2RNA_PYTHON": sys.executable,  # this interpreter as it is: no set-up, no download
        "CUDA_VISIBLE_DEVICES": "",  # the smoke run never touches a GPU, even where there is one
    }
    run = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "cpu-smoke on cpu" in run.stdout
    return json.loads(out.read_text())


def _rate(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_the_json_names_the_machine_and_the_run(smoke):
    assert smoke["mode"] == "cpu-smoke"
    env = smoke["environment"]
    keys = ("device", "device_name", "torch", "torch_cuda_build", "cuda_available", "python", "cpu_model")
    for key in keys:
        assert key in env
    assert env["device"] == "cpu" and env["device_name"]
    assert smoke["weights"].startswith("random")
    assert smoke["slide"]["tiles"] == 32 and smoke["slide"]["mpp"] == 0.5
    assert _rate(smoke["total_s"])


def test_extraction_figures_for_both_backbones(smoke):
    ext = smoke["extraction"]
    assert set(ext) == {"resnet50", "vit_tiny_patch16_224"}
    for name, r in ext.items():
        assert r["tiles"] == 32 and r["batch_size"] == 16, name
        assert r["precision"] in ("fp32", "bf16"), name
        assert _rate(r["pipeline_tiles_per_s"]) and _rate(r["backbone_only_tiles_per_s"]), name
        assert r["pipeline_vs_backbone_only"] == pytest.approx(
            r["pipeline_tiles_per_s"] / r["backbone_only_tiles_per_s"], rel=0.01
        )
        assert r["features_finite"] is True
        match = r["gpu_vs_cpu"]
        assert match["tiles"] == 16 and match["device"] == "cpu"
        for precision in ("fp32", r["precision"]):
            m = match[precision]
            assert -1 <= m["min_cosine"] <= m["median_cosine"] <= 1 + 1e-9
            assert m["pass"] == (m["min_cosine"] >= 0.999) and m["tiles_below_goal"] >= 0
        # the CPU against itself in fp32: the same network on the same tiles
        assert match["fp32"]["min_cosine"] >= 0.99999 and match["fp32"]["pass"]


def test_training_figures_streaming_and_in_memory(smoke):
    tr = smoke["training"]
    assert tr["genes"] == 50 and tr["cohort"]["slides"] == 8 and tr["cohort"]["dim"] == 2048
    assert "train_one" in tr["how"] and (tr["read_ahead_depth"] is None or tr["read_ahead_depth"] >= 0)
    assert 0 < tr["cohort"]["tiles_total"] <= 8 * 256
    for how in ("streaming", "in_memory"):
        r = tr[how]
        assert r["batches_per_epoch"] == 2 and r["batches"] == 2
        assert len(r["epoch_s"]) == len(r["batches_per_s_by_epoch"]) == 1
        assert _rate(r["batches_per_s"])
        assert 0 <= r["data_wait_fraction"] <= 1 and r["read_s"] >= 0
        assert r["device_busy_fraction_estimate"] == pytest.approx(1 - r["data_wait_fraction"], abs=2e-3)
    assert _rate(tr["streaming"]["read_mb_per_s_first_epoch"])
    assert tr["streaming_vs_in_memory"] == pytest.approx(
        tr["streaming"]["batches_per_s"] / tr["in_memory"]["batches_per_s"], rel=0.01
    )


def test_goals_are_reported_as_booleans(smoke):
    goals = smoke["goals"]
    assert set(goals) == {
        "gpu_features_match_cpu_fp32",
        "gpu_features_match_cpu_at_auto_precision",
        "pipeline_at_least_0.9_of_backbone_only",
        "streaming_at_least_0.9_of_in_memory",
    }
    assert all(isinstance(v, bool) for v in goals.values())
    assert goals["gpu_features_match_cpu_fp32"] is True  # the CPU matches itself


def test_the_script_refuses_an_interpreter_without_the_packages(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    run = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path / "x.json")],
        cwd=REPO,
        env={**os.environ, "HE2RNA_PYTHON": str(fake)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and "cannot import what the check needs" in run.stderr
    assert not (tmp_path / "x.json").exists()
