"""Bad input and faults through the CLI, as a user runs it (issue 11): one test per cause.

Each runs ``he2rna`` and checks the exit code, that an error is one sentence without a traceback, and that
every file that was there before is byte for byte as it was. What needs a process of its own (Ctrl-C, two
runs at once, the user's umask, lines printed while a run goes on) runs in a subprocess; the rest runs
``cli.main`` in this process (``conftest.run_cli_in_process``), which is what the console script calls.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_he2rna.features.cache import read_cache

SRC = Path(__file__).resolve().parents[1] / "src"
SLIDE = SRC / "napari_he2rna" / "sample_data" / "sample_slide.tiff"
STORE_GLOB = "sample_slide-*-hed-stats-112um.zarr"


def _env(home: Path) -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=str(SRC),
        HE2RNA_OFFLINE="1",
        HE2RNA_CACHE=str(home / "default-cache"),
        OMP_NUM_THREADS="1",
    )


def he2rna(*args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "napari_he2rna.cli", *map(str, args)],
        cwd=cwd,
        env=_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=lambda: os.umask(0o022),
    )


@pytest.fixture(scope="session")
def he2rna_here(cli_in_process):
    """``he2rna`` run in this process, with the environment :func:`he2rna` gives a subprocess."""

    def run(*args, cwd: Path) -> subprocess.CompletedProcess:
        env = {k: v for k, v in _env(cwd).items() if k in ("HE2RNA_OFFLINE", "HE2RNA_CACHE")}
        return cli_in_process(*args, cwd=cwd, env=env)

    return run


def popen(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "napari_he2rna.cli", *map(str, args)],
        cwd=cwd,
        env=_env(cwd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.umask(0o022),
    )


def one_sentence(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single ``he2rna: error:`` line of a failed run (asserting the exit code and no traceback)."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and "Error:" not in proc.stderr.replace("error:", "")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("he2rna: error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].endswith("."), errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, he2rna_here) -> Path:
    """A folder with one finished ``spatialize`` run (``out``) and its feature cache (``cache``)."""
    root = tmp_path_factory.mktemp("earlier")
    proc = he2rna_here(
        "spatialize", SLIDE, "--genes", "CD3D", "--out", "out", "--cache-dir", "cache", cwd=root
    )
    assert proc.returncode == 0, proc.stderr
    return root


@pytest.fixture
def work(tmp_path, earlier_run) -> Path:
    """A copy of the earlier run (outputs and cache) to damage."""
    shutil.copytree(earlier_run / "out", tmp_path / "out")
    shutil.copytree(earlier_run / "cache", tmp_path / "cache")
    return tmp_path


# 1 ------------------------------------------------------------------------------------ absurd sizes
def test_absurd_pixel_and_tile_sizes_are_refused(tmp_path, he2rna_here):
    for argv in (
        ["spatialize", SLIDE, "--mpp", "1e6", "--genes", "CD3D", "--out", "o"],
        ["predict", SLIDE, "--mpp", "1e6", "--out", "o"],
        ["extract", SLIDE, "--mpp", "1e6", "--backbone", "hed-stats", "--out", "o"],
    ):
        line = one_sentence(he2rna_here(*argv, cwd=tmp_path))
        assert "1e+06 µm/px" in line and "0.01 and 100 µm/px" in line
    line = one_sentence(
        he2rna_here("extract", SLIDE, "--tile-um", "0", "--backbone", "hed-stats", "--out", "o", cwd=tmp_path)
    )
    assert "tile size 0 µm" in line and "between 10 and" in line
    assert not any(tmp_path.iterdir())  # refused before anything was made
    # larger than this 1008 µm slide: a failed slide, named, with the range for this slide
    proc = he2rna_here(
        "extract", SLIDE, "--tile-um", "5000", "--backbone", "hed-stats", "--out", "o", cwd=tmp_path
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "5000 µm is not plausible" in proc.stderr and "for this slide" in proc.stderr
    assert not any((tmp_path / "o").iterdir())  # no store, no lock file


# 2 ------------------------------------------------------------------------------ corrupt caches
def test_one_flipped_bit_in_a_feature_chunk_is_detected_and_recomputed(work, earlier_run, he2rna_here):
    store = next((work / "cache").glob(STORE_GLOB))
    _, clean, _ = read_cache(next((earlier_run / "cache").glob(STORE_GLOB)))
    chunk = sorted((store / "features" / "c").rglob("*"))
    chunk = [p for p in chunk if p.is_file()][0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x04  # one bit, inside the compressed payload
    chunk.write_bytes(bytes(data))
    before = snapshot(work / "out")

    proc = he2rna_here("extract", SLIDE, "--backbone", "hed-stats", "--out", work / "cache", cwd=work)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if store.name in line]
    assert len(warned) == 1 and warned[0].startswith("he2rna: warning: ") and "recomputing" in warned[0]
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
    _, repaired, _ = read_cache(store)
    np.testing.assert_array_equal(repaired, clean)
    assert snapshot(work / "out") == before


# 3 ---------------------------------------------------------- read-only folders, files as folders
@pytest.fixture
def read_only(tmp_path):
    """A read-only folder: a read-only tmpfs as root (root ignores permissions), else mode 0555."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "kept.txt").write_text("mine")
    if os.geteuid() == 0:
        # copy the content in, then remount read-only
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(ro)]).returncode != 0:
            pytest.skip("cannot mount a tmpfs here to make a read-only folder")
        (ro / "kept.txt").write_text("mine")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        yield ro
        subprocess.run(["umount", str(ro)], check=True)
    else:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)


def test_read_only_folders_and_files_as_folders_are_one_sentence(work, read_only, he2rna_here):
    a_file = work / "a_file"
    a_file.write_text("not a folder")
    before, before_ro = snapshot(work), snapshot(read_only)
    cases = {
        (
            "spatialize",
            SLIDE,
            "--genes",
            "CD3D",
            "--out",
            read_only / "o",
            "--cache-dir",
            "cache",
        ): "Read-only",
        ("spatialize", SLIDE, "--genes", "CD3D", "--out", "o", "--cache-dir", read_only / "c"): "--cache-dir",
        ("spatialize", SLIDE, "--genes", "CD3D", "--out", a_file): "is a file",
        ("spatialize", SLIDE, "--genes", "CD3D", "--out", "o2", "--cache-dir", a_file): "is a file",
        ("predict", SLIDE, "--out", read_only, "--cache-dir", "cache"): "not writable",
        ("predict", SLIDE, "--out", a_file, "--cache-dir", "cache"): "is a file",
        ("extract", SLIDE, "--backbone", "hed-stats", "--out", read_only): "not writable",
        ("info", SLIDE, "--thumbnail", read_only / "thumb.png"): "not writable",
    }
    for argv, expected in cases.items():
        line = one_sentence(he2rna_here(*argv, cwd=work))
        if os.geteuid() == 0 or expected != "Read-only":
            assert expected in line, line
    after = snapshot(work)
    assert {k: v for k, v in after.items() if k in before} == before
    assert snapshot(read_only) == before_ro


# 4 ---------------------------------------------------------------- no overwrite, the user's umask
def test_outputs_are_never_replaced_without_overwrite_and_get_the_umask_mode(work):
    out = work / "pred"
    out.mkdir()
    mine = out / "sample_slide_prediction.csv"
    mine.write_bytes(b"my own table\n")
    mine.chmod(0o640)
    thumb = work / "existing.png"
    thumb.write_bytes(b"\x89PNG my picture")
    thumb.chmod(0o644)
    before = snapshot(work)
    line = one_sentence(he2rna("predict", SLIDE, "--out", out, "--cache-dir", "cache", cwd=work))
    assert str(mine) in line and "--overwrite" in line
    line = one_sentence(he2rna("info", SLIDE, "--thumbnail", thumb, cwd=work))
    assert str(thumb) in line and "--overwrite" in line
    assert snapshot(work) == before

    proc = he2rna("predict", SLIDE, "--out", out, "--cache-dir", "cache", "--overwrite", cwd=work)
    assert proc.returncode == 0, proc.stderr
    for name in ("sample_slide_prediction.csv", "sample_slide_tile_scores.csv"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644
    assert (out / "sample_slide_prediction.csv").read_bytes() != b"my own table\n"
    proc = he2rna("info", SLIDE, "--thumbnail", thumb, "--overwrite", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(thumb.stat().st_mode) == 0o644
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging or temporary file


# 5 ------------------------------------------------------------------------------ genes named
def test_represent_and_slide_ex_name_the_genes_they_leave_out(tmp_path, he2rna_here):
    genes = ["CD3D", "MS4A1", "KRT8"]
    ids = [f"s{i}" for i in range(6)]
    expr = pd.DataFrame(np.arange(18, dtype=float).reshape(6, 3) + 1.0, index=ids, columns=genes)
    expr.loc["s2", "CD3D"] = np.nan
    expr.index.name = "sample_id"
    expr.to_csv(tmp_path / "expr.tsv", sep="\t")
    (tmp_path / "ct").mkdir()
    expr.to_csv(tmp_path / "ct" / "T.tsv", sep="\t")
    sheet = pd.DataFrame(
        {"sample_id": ids, "patient_id": ids, "cancer_type": "X", "slide": [f"{s}.tiff" for s in ids]}
    )
    sheet.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    runs = {
        "represent": he2rna_here(
            "represent", "--samples", "samples.tsv", "--expression", "expr.tsv", "--model", "r.safetensors",
            "--backbone", "hed-stats", "--no-export", cwd=tmp_path,
        ),
        "slide-ex": he2rna_here(
            "slide-ex", "--samples", "samples.tsv", "--celltype-expression", "ct", "--out", "s",
            "--backbone", "hed-stats", cwd=tmp_path,
        ),
    }  # fmt: skip
    for name, proc in runs.items():
        assert "Traceback" not in proc.stderr and "RuntimeWarning" not in proc.stderr, name
        warned = [line for line in proc.stderr.splitlines() if "genes left out" in line]
        assert len(warned) == 1 and "CD3D" in warned[0] and "missing values" in warned[0], (name, proc.stderr)


# 6 --------------------------------------------------------------------- Ctrl-C during overwrite
def test_ctrl_c_during_an_overwrite_leaves_the_earlier_set_or_the_new_one(work):
    before = snapshot(work / "out")
    # Another pixel size: other tiles, so every output differs from the earlier run's (same names).
    proc = popen(
        "spatialize", SLIDE, "--genes", "CD3D", "--out", "out", "--cache-dir", "cache", "--overwrite",
        "--mpp", "0.55", cwd=work,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    # Ctrl-C as soon as the first new output file is written (the others are still to come).
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.is_file() for p in (work / "out").glob(".he2rna-staging-*/*")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err
    after = snapshot(work / "out")
    assert set(after) == set(before)  # no staging folder or temporary file left
    changed = {name for name in before if after[name] != before[name]}
    assert changed in (set(), set(before)), f"a mix of old and new files: {sorted(changed)} are new"


# 7 ------------------------------------------------------------------------------- two at once
def test_two_extract_processes_on_one_cohort(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(3):
        shutil.copy(SLIDE, slides / f"slide{i}.tiff")
    argv = ["extract", slides, "--backbone", "hed-stats", "--out", "stores", "--max-tiles", "40"]
    procs = [popen(*argv, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "Traceback" not in err and "3 of 3 slides have features." in out
    stores = sorted((tmp_path / "stores").glob("*.zarr"))
    assert len(stores) == 3
    assert not list((tmp_path / "stores").glob("*.partial"))
    first = read_cache(stores[0])[1]
    for store in stores:
        np.testing.assert_array_equal(read_cache(store)[1], first)  # same pixels, same features


# 8 --------------------------------------------------------------------------- clear messages
def test_messages_point_at_the_fix(tmp_path, he2rna_here):
    # a genes x samples table without --genes-as-rows
    pd.DataFrame({"gene": ["CD3D", "KRT8"], "s1": [1.0, 2.0], "s2": [3.0, 4.0]}).to_csv(
        tmp_path / "expr.tsv", sep="\t", index=False
    )
    pd.DataFrame({"sample_id": ["s1", "s2"], "patient_id": ["p1", "p2"], "cancer_type": "X"}).to_csv(
        tmp_path / "samples.tsv", sep="\t", index=False
    )
    line = one_sentence(
        he2rna_here(
            "represent",
            "--samples",
            "samples.tsv",
            "--expression",
            "expr.tsv",
            "--model",
            "r",
            "--no-export",
            cwd=tmp_path,
        )  # fmt: skip
    )
    assert "--genes-as-rows" in line

    # extract says each slide's line as soon as that slide is done
    shutil.copy(SLIDE, tmp_path / "a.tiff")
    shutil.copy(SLIDE, tmp_path / "b.tiff")
    proc = popen("extract", "a.tiff", "b.tiff", "--backbone", "hed-stats", "--out", "st", cwd=tmp_path)
    first = proc.stdout.readline()
    still_running = proc.poll() is None
    b_done = list((tmp_path / "st").glob("b-*.zarr"))
    rest, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "a.tiff" in first and still_running and not b_done
    assert "b.tiff" in rest
