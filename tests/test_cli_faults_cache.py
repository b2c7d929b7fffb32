"""Faults of issue 21 around the feature cache and the cohort tables: one test per cause.

Infinite expression values (9), a lock file deleted while a store is written (10, at the library level: two
writers in threads, interleaved by hand), flipped bytes in the supertiles (11), empty slide cells of an
``extract`` manifest (12), pickled backbone snapshots (13), a read-only cache whose stores are all complete,
and ``--genes-as-rows`` given for a samples x genes table. The rest runs ``he2rna`` through ``cli.main`` in
this process (``conftest.run_cli_in_process``) and checks the exit code, the one sentence, and that nothing
was written where it should not be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from napari_he2rna.errors import CacheError, ModelError
from napari_he2rna.features import cache
from napari_he2rna.features.cache import cache_path, load_or_extract, read_cache, read_supertiles
from napari_he2rna.features.extraction import ExtractOptions
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.network import HE2RNA
from napari_he2rna.slides.slide import open_slide
from napari_he2rna.synthetic import make_cohort

SLIDE = Path(__file__).resolve().parents[1] / "src" / "napari_he2rna" / "sample_data" / "sample_slide.tiff"
EXTRACT = ("--backbone", "hed-stats", "--max-tiles", "40")


def error_line(proc, alone: bool = True) -> str:
    """The one ``he2rna: error:`` sentence of a refused run (exit 2), with no traceback; ``alone``: and
    nothing else on stderr."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("he2rna: error:")]
    assert len(lines) == 1 and (not alone or len(proc.stderr.strip().splitlines()) == 1), proc.stderr
    assert lines[0].endswith("."), lines[0]
    return lines[0]


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def flip_a_byte(array_folder: Path) -> None:
    chunk = [p for p in files_under(array_folder) if p.name != "zarr.json"][0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x04
    chunk.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    types = ["SYN-BRCA", "SYN-COAD"]
    make_cohort(root / "cohort", n_slides=8, seed=5, size_px=(672, 672), cancer_types=types)
    return root


def train(cli, root: Path, expression: Path, *extra: str):
    out = root / f"{expression.stem}.safetensors"
    argv = ["train", "--samples", root / "cohort" / "samples.tsv", "--expression", expression]
    argv += ["--cache-dir", root / "features", "--backbone", "hed-stats", "--hidden", "8", "--epochs", "2"]
    return cli(*argv, "--folds", "2", "--out", out, *extra), out


# 9 ------------------------------------------------------------------------ infinite expression values
def test_infinite_expression_values_leave_their_gene_out_by_name(cohort_root, cli_in_process):
    expr = pd.read_csv(cohort_root / "cohort" / "expression.tsv", sep="\t", index_col=0)
    expr.loc["SYN-0002", "CD3E"] = np.inf
    expr.loc["SYN-0005", "KRT8"] = -np.inf
    table = cohort_root / "cohort" / "expression_inf.tsv"
    expr.to_csv(table, sep="\t")

    proc, out = train(cli_in_process, cohort_root, table)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "infinite values" in line]
    assert len(warned) == 1 and warned[0].startswith("he2rna: warning: genes left out: 2 with infinite")
    assert "CD3E in sample SYN-0002" in warned[0] and "KRT8 in sample SYN-0005" in warned[0]
    assert "transform: none (already log)" in proc.stdout  # an infinite value is not taken for raw FPKM
    bundle = load_bundle(out)
    assert "CD3E" not in bundle.genes and "KRT8" not in bundle.genes and len(bundle.genes) == 35
    for fold in bundle.layers:
        for weight, bias in fold:
            assert torch.isfinite(weight).all() and torch.isfinite(bias).all()


def test_a_bundle_with_non_finite_weights_is_never_written(tmp_path):
    net = HE2RNA(input_dim=4, n_genes=2, hidden=(3,))
    with torch.no_grad():
        next(net.parameters())[0, 0] = float("nan")
    out = tmp_path / "m.safetensors"
    with pytest.raises(ModelError, match=r"non-finite weights \(fold0\..*nothing was written"):
        save_bundle(out, [net], ["A", "B"], "hed-stats", 4, 112.0, ks=[1])
    assert not out.exists() and not list(tmp_path.iterdir())


# 10 ------------------------------------------------------------------- a lock file deleted mid-run
@pytest.fixture
def store(tmp_path):
    """The (slide path, options, cache folder, store path) of a small hed-stats store in 5 batches."""
    options = ExtractOptions(backbone="hed-stats", max_tiles=40, batch_size=8, device="cpu")
    with open_slide(SLIDE) as slide:
        final = cache_path(slide, "hed-stats", options.tile_um, tmp_path / "cache")
    return options, tmp_path / "cache", final


def extract(options, cache_dir, **kwargs):
    with open_slide(SLIDE) as slide:
        return load_or_extract(slide, "hed-stats", options, cache_dir=cache_dir, **kwargs)


def test_a_writer_whose_lock_file_was_replaced_never_commits(store, monkeypatch):
    options, cache_dir, final = store
    lock = final.with_name(final.name + ".lock")
    real = cache.supertiles
    second: list = []

    def race(*args, **kwargs):  # writer A is about to commit: its lock file goes, writer B runs
        if not second:
            second.append(None)
            lock.unlink()
            b = threading.Thread(target=lambda: second.append(extract(options, cache_dir)))
            b.start()
            b.join()
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "supertiles", race)
    with pytest.raises(CacheError, match=r"lock file .* was deleted or replaced .* nothing was committed"):
        extract(options, cache_dir)
    assert len(second) == 2  # writer B finished, and its store is the one left, whole
    assert not list(cache_dir.glob("*.partial"))
    grid, features, _ = read_cache(final)
    np.testing.assert_array_equal(features, second[1][1])
    assert read_supertiles(final)[1].shape == (len(grid.table),)


def test_a_lock_file_deleted_with_no_other_writer_stops_the_run_and_it_resumes(store):
    options, cache_dir, final = store
    lock = final.with_name(final.name + ".lock")
    batches = []

    def delete_lock_after_the_first_batch(rows, feats):
        batches.append(len(rows))
        if len(batches) == 1:
            lock.unlink()

    with pytest.raises(CacheError, match="was deleted or replaced"):
        extract(options, cache_dir, batch_ready=delete_lock_after_the_first_batch)
    assert len(batches) == 1 and not final.exists()
    resumed = []
    grid, features = extract(options, cache_dir, batch_ready=lambda rows, feats: resumed.append(len(rows)))
    assert resumed[0] == 8 and sum(resumed) == 40  # the first batch's rows, then the 4 batches left
    np.testing.assert_array_equal(read_cache(final)[1], features)


# 11 ----------------------------------------------------------------- flipped bytes in the supertiles
@pytest.mark.parametrize("array", ["supertiles/features", "supertiles/labels"])
def test_a_flipped_byte_in_the_supertiles_is_detected_and_repaired(tmp_path, cli_in_process, array):
    argv = ["extract", SLIDE, *EXTRACT, "--cache-dir", tmp_path / "c"]
    assert cli_in_process(*argv, cwd=tmp_path).returncode == 0
    final = next((tmp_path / "c").glob("*.zarr"))
    clean = read_supertiles(final)
    flip_a_byte(final / array)

    proc = cli_in_process(*argv, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    warned = proc.stderr.strip().splitlines()
    assert len(warned) == 1 and warned[0].startswith("he2rna: warning: ") and final.name in warned[0]
    assert warned[0].endswith("recomputing its supertiles.")
    assert " ok " in proc.stdout and "cached" not in proc.stdout
    for repaired, before in zip(read_supertiles(final), clean, strict=True):
        np.testing.assert_array_equal(repaired, before)

    proc = cli_in_process(*argv, cwd=tmp_path)  # repaired: cached again, without a word
    assert proc.returncode == 0 and proc.stderr == "" and "cached" in proc.stdout


def test_a_store_recomputed_for_a_flipped_feature_byte_is_reported_ok_not_cached(tmp_path, cli_in_process):
    # extract reads a cached store once (no second, checksumming read just to say "cached"); a store it had
    # to recompute is a new one, reported "ok"
    argv = ["extract", SLIDE, *EXTRACT, "--cache-dir", tmp_path / "c"]
    assert cli_in_process(*argv, cwd=tmp_path).returncode == 0
    final = next((tmp_path / "c").glob("*.zarr"))
    flip_a_byte(final / "features")
    proc = cli_in_process(*argv, cwd=tmp_path)
    assert proc.returncode == 0 and "recomputing it" in proc.stderr
    assert " ok " in proc.stdout and "cached" not in proc.stdout
    proc = cli_in_process(*argv, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "" and "cached" in proc.stdout


def test_a_store_without_supertile_checksums_is_still_read(tmp_path, cli_in_process):
    argv = ["extract", SLIDE, *EXTRACT, "--cache-dir", tmp_path / "c"]
    assert cli_in_process(*argv, cwd=tmp_path).returncode == 0
    final = next((tmp_path / "c").glob("*.zarr"))
    meta = json.loads((final / "zarr.json").read_text())
    checksums = meta["attributes"]["checksums"]
    meta["attributes"]["checksums"] = {k: v for k, v in checksums.items() if not k.startswith("supertiles/")}
    (final / "zarr.json").write_text(json.dumps(meta))
    assert read_supertiles(final)[0].shape[0] > 0
    proc = cli_in_process(*argv, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "" and "cached" in proc.stdout


# 12 -------------------------------------------------------------- an empty slide cell in a manifest
def test_a_manifest_row_without_a_slide_is_named_and_counted(tmp_path, cli_in_process):
    for name in ("a.tiff", "b.tiff"):
        shutil.copy(SLIDE, tmp_path / name)
    (tmp_path / "m.csv").write_text("sample_id,slide\ns1,a.tiff\ns2,\ns3,b.tiff\ns4,  \n")
    argv = ["extract", tmp_path / "m.csv", *EXTRACT, "--cache-dir", tmp_path / "c"]
    proc = cli_in_process(*argv, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [
        "he2rna: m.csv row 3 (sample_id s2): failed: its slide cell is empty; fill it or remove the row.",
        "he2rna: m.csv row 5 (sample_id s4): failed: its slide cell is empty; fill it or remove the row.",
    ]
    assert proc.stdout.splitlines()[-1] == "2 of 4 slides have features; 2 failed."

    (tmp_path / "empty.csv").write_text("sample_id,slide\ns1,\n")
    before = files_under(tmp_path)
    line = error_line(cli_in_process("extract", tmp_path / "empty.csv", *EXTRACT, cwd=tmp_path))
    assert "no slides found" in line and "empty.csv row 2 (sample_id s1)" in line
    assert files_under(tmp_path) == before


# 13 ------------------------------------------------------------------- a pickled backbone snapshot
class Payload:
    """What a malicious checkpoint carries: unpickling it would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_a_pickled_snapshot_is_one_sentence_and_never_runs(tmp_path, cli_in_process, library):
    pytest.importorskip(library)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    if library == "timm":
        vit = {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 224, "patch_size": 16}
        config = {"architecture": "vit_base_patch16_224", "num_classes": 0, "model_args": vit}
    else:
        import transformers

        config = transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        ).to_dict()
    (snapshot / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "payload-ran"
    torch.save({"patch_embed.proj.weight": torch.zeros(1), "x": Payload(ran)}, snapshot / "pytorch_model.bin")

    proc = cli_in_process(
        "extract", SLIDE, "--backbone", snapshot, "--cache-dir", tmp_path / "c", "--max-tiles", "4",
        cwd=tmp_path, env={"HE2RNA_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    line = error_line(proc)
    assert f"{snapshot / 'pytorch_model.bin'}: it is not a weights-only checkpoint" in line
    assert "safetensors" in line and "weights_only" not in line and "PyTorch 2.6" not in line
    assert not ran.exists()
    assert files_under(tmp_path / "c") == []


# also seen -------------------------------------------------------- a read-only cache of complete stores
@pytest.fixture
def read_only_cache(tmp_path, cli_in_process):
    """A read-only folder holding the complete store of the sample slide (a read-only tmpfs as root)."""
    assert cli_in_process("extract", SLIDE, *EXTRACT, "--cache-dir", tmp_path / "c").returncode == 0
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        shutil.copytree(tmp_path / "c", ro, dirs_exist_ok=True)
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(ro)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here to make a read-only folder")
    try:
        shutil.copytree(tmp_path / "c", ro, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_extract_reads_a_read_only_cache_whose_stores_are_complete(tmp_path, read_only_cache, cli_in_process):
    before = {p: p.read_bytes() for p in files_under(read_only_cache)}
    proc = cli_in_process("extract", SLIDE, *EXTRACT, "--cache-dir", read_only_cache, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "cached" in proc.stdout and "1 of 1 slides have features." in proc.stdout

    shutil.copy(SLIDE, tmp_path / "other.tiff")  # no store there, and none can be written
    proc = cli_in_process(
        "extract", SLIDE, tmp_path / "other.tiff", *EXTRACT, "--cache-dir", read_only_cache, cwd=tmp_path
    )
    line = error_line(proc)
    assert "not writable" in line and "1 of 2 slides have no complete store there, e.g. other.tiff" in line
    assert {p: p.read_bytes() for p in files_under(read_only_cache)} == before


# also seen ------------------------------------------------------- --genes-as-rows on samples x genes
def test_genes_as_rows_on_a_samples_by_genes_table_says_to_leave_it_out(cohort_root, cli_in_process):
    table = cohort_root / "cohort" / "expression.tsv"  # samples x genes
    proc, out = train(cli_in_process, cohort_root, table, "--genes-as-rows")
    line = error_line(proc, alone=False)  # after the lines of the features it read
    assert line.endswith("the expression table is samples x genes already, leave --genes-as-rows out.")
    assert "pass --genes-as-rows" not in line
    assert not out.exists()
