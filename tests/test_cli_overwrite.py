"""Commands that write models or result folders never replace a user's file without --overwrite.

Each command is pointed at an output that already exists and at inputs that do not: it must stop with the
--overwrite message before reading anything, and leave the existing file byte for byte as it was.
"""

from __future__ import annotations

import pytest

from napari_he2rna.cli import main

SENTINEL = b"a user's precious file\n"


def _cases(tmp):
    missing = str(tmp / "missing.tsv")
    cohort = ["--samples", missing, "--expression", missing]
    return {
        "train": (["train", *cohort, "--out", str(tmp / "m.safetensors")], tmp / "m.safetensors"),
        "evaluate": (
            ["evaluate", "--model", str(tmp / "x.safetensors"), *cohort, "--out", str(tmp / "rep")],
            tmp / "rep" / "report.md",
        ),
        "make-demo-model": (
            ["make-demo-model", "--out", str(tmp / "demo.safetensors"), "--work", str(tmp / "w")],
            tmp / "demo.safetensors",
        ),
        "represent-train": (
            ["represent", *cohort, "--model", str(tmp / "rep.safetensors"), "--no-export"],
            tmp / "rep.safetensors",
        ),
        "represent-export": (
            [
                "represent",
                "--samples",
                missing,
                "--model",
                str(tmp / "r.safetensors"),
                "--out",
                str(tmp / "r.tsv"),
            ],
            tmp / "r.tsv",
        ),
        "transfer": (["transfer", *cohort, "--out", str(tmp / "t")], tmp / "t" / "aucs.csv"),
        "slide-ex": (
            ["slide-ex", "--samples", missing, "--abundance", missing, "--out", str(tmp / "s")],
            tmp / "s" / "summary.csv",
        ),
    }


@pytest.mark.parametrize(
    "name",
    ["train", "evaluate", "make-demo-model", "represent-train", "represent-export", "transfer", "slide-ex"],
)
def test_existing_output_is_refused_before_any_work(tmp_path, capsys, name):
    argv, existing = _cases(tmp_path)[name]
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_bytes(SENTINEL)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(existing) in err
    assert existing.read_bytes() == SENTINEL
    if name == "make-demo-model":
        return  # it has no input to miss: with --overwrite it would build the whole demo model
    # with --overwrite the command goes on, to the next problem: the missing input
    assert main([*argv, "--overwrite"]) == 2
    assert "--overwrite" not in capsys.readouterr().err
    assert existing.read_bytes() == SENTINEL
