"""Faults of issue 21 around ``spatialize`` and ``predict``: one test per cause, through the CLI.

Ctrl-C at every stage of a real ``spatialize`` run (1), the README's inline gene-set syntax (6), set names
that shadow a gene or are defined twice (7), ``--overwrite`` leaving files of the earlier run (8), the lock's
"waiting" line said only after the run, and failed runs leaving empty output folders. What needs a process
of its own (signals, a lock held by another process, lines printed while a run waits) runs in a subprocess;
the rest runs ``cli.main`` in this process (``conftest.run_cli_in_process``).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
SLIDE = SRC / "napari_he2rna" / "sample_data" / "sample_slide.tiff"
GENES = "CD3D,MKI67"

# Runs ``he2rna ARGS`` after arranging to pause at one point of the run, named by HE2RNA_TEST_PAUSE, and to
# say so (HE2RNA_TEST_MARKER is written): the test then sends Ctrl-C there. ``call:MODULE:NAME[:n]`` pauses
# before the n-th call of NAME (looked up in MODULE: a function or Class.method), ``return:...`` after it,
# ``thread:n`` right after the n-th thread started by the main thread has started (as when Ctrl-C comes while
# a thread pool starts a worker). Nothing else of the run changes.
LAUNCHER = r"""
import importlib, os, sys, threading, time
from pathlib import Path

spec = os.environ["HE2RNA_TEST_PAUSE"].split(":")
marker = Path(os.environ["HE2RNA_TEST_MARKER"])


def pause():
    marker.write_text("paused")
    for _ in range(3000):  # Ctrl-C ends it (short sleeps: the signal may reach another thread first)
        time.sleep(0.1)


if spec[0] == "thread":
    start, started = threading.Thread.start, [0]

    def counted_start(self):
        start(self)
        if threading.current_thread() is threading.main_thread():
            started[0] += 1
            if started[0] == int(spec[1]):
                pause()

    threading.Thread.start = counted_start
else:
    kind, module, name = spec[:3]
    nth, calls = int(spec[3]) if len(spec) > 3 else 1, [0]
    owner = importlib.import_module(module)
    *path, attr = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        hit = calls[0] == nth
        if hit and kind == "call":
            pause()
        result = original(*args, **kwargs)
        if hit and kind == "return":
            pause()
        return result

    setattr(owner, attr, wrapper)

from napari_he2rna import cli

sys.exit(cli.main(sys.argv[1:]))
"""


def _env(cache: Path, **extra: str) -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=str(SRC),
        HE2RNA_OFFLINE="1",
        HE2RNA_CACHE=str(cache),
        OMP_NUM_THREADS="1",
        **extra,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(proc, code: int = 2) -> str:
    """The one ``he2rna: error:`` sentence of a refused run, with no traceback."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("he2rna: error:")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].endswith("."), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cli_in_process) -> Path:
    """``old``: a finished ``spatialize`` of GENES at another pixel size (every file differs from a run at
    the slide's own); ``cache``: the features at the slide's own pixel size (what a new run reuses)."""
    root = tmp_path_factory.mktemp("maps-runs")
    env = {"HE2RNA_OFFLINE": "1", "HE2RNA_CACHE": str(root / "cache")}
    for argv in (
        ["spatialize", SLIDE, "--genes", GENES, "--out", "old", "--mpp", "0.55", "--cache-dir", "old-cache"],
        ["spatialize", SLIDE, "--genes", GENES, "--out", "warm"],
    ):
        proc = cli_in_process(*argv, cwd=root, env=env)
        assert proc.returncode == 0, proc.stderr
    return root


# 1 ------------------------------------------------------------------------------- Ctrl-C at any point
CACHED_STAGES = [
    "call:napari_he2rna.maps.session:SlideSession.scores_frame",  # scoring
    *(f"return:napari_he2rna.safe_output:atomic_write:{n}" for n in range(1, 8)),  # each file staged
    "call:napari_he2rna.safe_output:commit_folder",
    "thread:2",  # the thumbnail's reader threads, after the GeoJSON (the first start is the store's I/O)
    "thread:3",
]
FRESH_STAGES = [  # no features cached yet
    "call:napari_he2rna.features.cache:tile_grid",  # tiling
    "return:napari_he2rna.features.extraction:BatchRunner.__call__",  # extraction, after the first batch
    "thread:1",  # tiling's thumbnail readers
    "thread:2",
    "thread:4",  # the tile readers of the extraction
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "fresh"), [(s, False) for s in CACHED_STAGES] + [(s, True) for s in FRESH_STAGES]
)
def test_ctrl_c_at_any_stage_of_spatialize_exits_within_seconds(runs, tmp_path, stage, fresh):
    shutil.copytree(runs / "old", tmp_path / "out")
    cache = tmp_path / "cache"
    if not fresh:
        shutil.copytree(runs / "cache", cache)
    before = snapshot(tmp_path / "out")
    (tmp_path / "launch.py").write_text(LAUNCHER)
    marker = tmp_path / "paused"
    proc = subprocess.Popen(
        [sys.executable, "launch.py", "spatialize", SLIDE, "--genes", GENES, "--out", "out", "--overwrite"],
        cwd=tmp_path,
        env=_env(cache, HE2RNA_TEST_PAUSE=stage, HE2RNA_TEST_MARKER=str(marker)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), f"the run never reached {stage}: {proc.communicate(timeout=60)[1]}"
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"still running 10 s after Ctrl-C at {stage}: {err[-2000:]}")
    assert time.monotonic() - sent < 10
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "he2rna: interrupted." in err, err
    after = snapshot(tmp_path / "out")
    assert set(after) == set(before), "a staging folder, temporary file or missing file"
    changed = {name for name in before if after[name] != before[name]}
    assert changed in (set(), set(before)), f"a mix of old and new files: {sorted(changed)} are new"


# 6 ------------------------------------------------------------------- the README's inline gene sets
def test_spatialize_takes_the_inline_gene_set_syntax_as_predict_does(runs, tmp_path, cli_in_process):
    env = {"HE2RNA_OFFLINE": "1", "HE2RNA_CACHE": str(runs / "cache")}
    genes = "MKI67,CD3D+CD3E,T=CD3D+CD3E+CD3G"
    spatial = cli_in_process("spatialize", SLIDE, "--genes", genes, "--out", "s", cwd=tmp_path, env=env)
    assert spatial.returncode == 0, spatial.stderr
    predicted = cli_in_process("predict", SLIDE, "--genes", genes, "--out", "p", cwd=tmp_path, env=env)
    assert predicted.returncode == 0, predicted.stderr
    names = ["MKI67", "CD3D+CD3E", "T"]
    tiles = pd.read_csv(tmp_path / "s" / "sample_slide_tile_scores.csv")
    assert [c for c in tiles.columns if c in names] == names
    assert {p.name for p in (tmp_path / "s").glob("*.png")} == {
        "sample_slide_MKI67.png",
        "sample_slide_CD3D_CD3E.png",
        "sample_slide_T.png",
    }
    # the same scores as predict's
    other = pd.read_csv(tmp_path / "p" / "sample_slide_tile_scores.csv")
    np.testing.assert_allclose(tiles[names].to_numpy(), other[names].to_numpy(), rtol=1e-5)
    slide_level = pd.read_csv(tmp_path / "s" / "sample_slide_tile_scores_slide.csv").set_index("name")
    predicted_t = pd.read_csv(tmp_path / "p" / "sample_slide_prediction.csv").set_index("gene").loc["T"]
    assert slide_level.loc["T", "slide_prediction"] == pytest.approx(predicted_t["prediction"], abs=1e-4)


# 7 ------------------------------------------------- set names that shadow a gene or are defined twice
@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["predict", "--genes", "CD3D=MKI67"], "CD3D"),
        (["predict", "--genes", "T=CD3D,T=MKI67"], "T"),
        (["predict", "--genes", "MKI67", "--gene-sets", "T=CD3D;T=MKI67"], "T"),
        (["predict", "--genes", "T=MKI67", "--gene-sets", "T=CD3D"], "T"),
        (["predict", "--genes", "MKI67", "--gene-sets", "cd3e=MKI67"], "cd3e"),
        (["spatialize", "--genes", "CD3D=MKI67"], "CD3D"),
        (["spatialize", "--genes", "CD3D", "--gene-sets", "CD3D=MKI67"], "CD3D"),
        (["spatialize", "--genes", "T=CD3D,T=MKI67"], "T"),
        (["spatialize", "--genes", "T", "--gene-sets", "T=CD3D;T=MKI67"], "T"),
        (["spatialize", "--genes", "T=MKI67", "--gene-sets", "T=CD3D"], "T"),
    ],
)
def test_set_names_that_shadow_a_gene_or_repeat_are_refused(runs, tmp_path, cli_in_process, argv, named):
    env = {"HE2RNA_OFFLINE": "1", "HE2RNA_CACHE": str(runs / "cache")}
    proc = cli_in_process(argv[0], SLIDE, *argv[1:], "--out", "o", cwd=tmp_path, env=env)
    line = error_line(proc)
    assert repr(named) in line, line
    assert not (tmp_path / "o").exists()  # refused before any work


def test_the_model_dock_session_refuses_them_too(tmp_path):
    """The Model dock defines sets through :meth:`SlideSession.add_gene_sets` and paints through
    :meth:`SlideSession.resolve`: the same function, the same refusals."""
    from napari_he2rna.errors import GeneError
    from napari_he2rna.maps.gene_sets import parse_gene_sets
    from napari_he2rna.maps.session import SlideSession

    with pytest.raises(GeneError, match="'T'.*twice"):
        parse_gene_sets("T=CD3D;T=MKI67")
    with SlideSession.open(SLIDE, model=None) as session:
        session.set_model(None)
        with pytest.raises(GeneError, match="'T'.*twice"):
            session.add_gene_sets("T=CD3D;T=MKI67")
        session.add_gene_sets({"CD3D": ["MKI67"]})  # as the dock's registry passes them, model or not
        with pytest.raises(GeneError, match="'CD3D'.*gene of this model"):
            session.resolve("CD3D")
        assert session.resolve("MKI67") == {"MKI67": ["MKI67"]}


# 8 ----------------------------------------------------- --overwrite replaces the slide's whole set
def user_files(folder: Path) -> dict[str, bytes]:
    """Files of the user beside the outputs: never removed."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("mine\n")
    Image.new("RGB", (4, 4), "red").save(folder / "sample_slide_photo.png")  # a PNG of the user's
    Image.new("RGB", (4, 4), "blue").save(folder / "other_slide_CD3D.png")
    (folder / "other_slide_tile_scores.csv").write_text("x\n1\n")  # another slide's outputs
    return snapshot(folder)


def test_spatialize_overwrite_removes_the_earlier_runs_other_files(runs, tmp_path, cli_in_process):
    env = {"HE2RNA_OFFLINE": "1", "HE2RNA_CACHE": str(runs / "cache")}
    mine = user_files(tmp_path / "out")
    first = cli_in_process("spatialize", SLIDE, "--genes", GENES, "--out", "out", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    proc = cli_in_process(
        "spatialize", SLIDE, "--genes", "MKI67", "--out", "out", "--overwrite", "--no-geojson",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    left = set(snapshot(tmp_path / "out"))
    ours = {
        "sample_slide_tile_scores.csv",
        "sample_slide_tile_scores_slide.csv",
        "sample_slide_tile_scores.json",
        "sample_slide_tiles.h5ad",
        "sample_slide_MKI67.png",
    }
    assert left == ours | set(mine)
    assert all(snapshot(tmp_path / "out")[k] == v for k, v in mine.items())
    said = proc.stdout + proc.stderr
    assert "sample_slide_CD3D.png" in said and "sample_slide_tiles.geojson" in said, said


def test_predict_overwrite_without_tile_scores_removes_the_earlier_tile_files(
    runs, tmp_path, cli_in_process, monkeypatch
):
    env = {"HE2RNA_OFFLINE": "1", "HE2RNA_CACHE": str(runs / "cache")}
    mine = user_files(tmp_path / "out")
    first = cli_in_process("predict", SLIDE, "--genes", "CD3D", "--out", "out", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    # as a model of 20,000 genes without --genes: no per-tile scores
    monkeypatch.setattr("napari_he2rna.maps.predict.MAX_TILE_GENES_BY_DEFAULT", 10)
    proc = cli_in_process("predict", SLIDE, "--out", "out", "--overwrite", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert set(snapshot(tmp_path / "out")) == {"sample_slide_prediction.csv"} | set(mine)
    said = proc.stdout + proc.stderr
    for name in ("sample_slide_tile_scores.csv", "sample_slide_tile_scores.json", "sample_slide_tiles.h5ad"):
        assert name in said, said
    assert len(pd.read_csv(tmp_path / "out" / "sample_slide_prediction.csv")) == 37  # every gene


# also seen -------------------------------------------------------- the lock's waiting line, at once
def test_spatialize_says_at_once_that_it_waits_for_another_process(runs, tmp_path):
    from filelock import FileLock

    shutil.copytree(runs / "cache", tmp_path / "cache")
    (lock_path,) = (tmp_path / "cache").glob("*.zarr.lock")
    lines: list[tuple[float, str]] = []
    with FileLock(str(lock_path)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "napari_he2rna.cli", "spatialize", SLIDE, "--genes", "CD3D", "--out", "o"],
            cwd=tmp_path,
            env=_env(tmp_path / "cache"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        reader = threading.Thread(
            target=lambda: lines.extend((time.monotonic(), line) for line in proc.stderr), daemon=True
        )
        reader.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("waiting" in line for _, line in lines):
            time.sleep(0.05)
        released = time.monotonic()
    assert proc.wait(timeout=120) == 0
    reader.join(timeout=10)
    waiting = [(t, line) for t, line in lines if "waiting" in line]
    assert len(waiting) == 1 and waiting[0][0] < released, lines
    assert waiting[0][1].startswith("he2rna: warning: another he2rna process is writing")


# also seen ------------------------------------------------------ failed runs leave no empty folder
def test_failed_runs_leave_no_output_folder(runs, tmp_path, cli_in_process):
    import tifffile

    tifffile.imwrite(tmp_path / "blank.tiff", np.full((1024, 1024, 3), 255, np.uint8), tile=(256, 256))
    env = {"HE2RNA_OFFLINE": "1", "HE2RNA_CACHE": str(tmp_path / "cache")}
    for command, extra in (("spatialize", ["--genes", "CD3D"]), ("predict", [])):
        out = tmp_path / command / "deeper"
        proc = cli_in_process(
            command, "blank.tiff", "--mpp", "0.5", *extra, "--out", out, cwd=tmp_path, env=env
        )
        assert "no tissue" in error_line(proc)
        assert not (tmp_path / command).exists(), command
    # an existing folder stays, as it was
    (tmp_path / "kept").mkdir()
    proc = cli_in_process("spatialize", "blank.tiff", "--mpp", "0.5", "--genes", "CD3D", "--out", "kept",
                          cwd=tmp_path, env=env)  # fmt: skip
    error_line(proc)
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())
    assert stat.S_ISDIR((tmp_path / "kept").stat().st_mode)
