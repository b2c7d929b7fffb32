"""Sheets from other tools: the slide column's common names, --slide-column, and one spelling per option."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pandas as pd
import pytest

from napari_he2rna.cli import main
from napari_he2rna.cohorts import cohort
from napari_he2rna.commands.extract import expand_slides
from napari_he2rna.errors import DataError
from napari_he2rna.maps import gene_sets


def test_extract_manifest_with_slide_path_column(tmp_path):
    sheet = tmp_path / "samples.csv"
    pd.DataFrame({"slide_path": ["/data/a.svs", "b.svs"]}).to_csv(sheet, index=False)
    assert expand_slides([str(sheet)]) == [Path("/data/a.svs"), tmp_path / "b.svs"]


def test_extract_manifest_with_file_name_and_relative_paths(tmp_path):
    (tmp_path / "sheets").mkdir()
    sheet = tmp_path / "sheets" / "samples.tsv"
    pd.DataFrame({"Sample": ["s1", "s2"], "file_name": ["../slides/s1.svs", "s2.tiff"]}).to_csv(
        sheet, sep="\t", index=False
    )
    assert expand_slides([str(sheet)]) == [
        tmp_path / "sheets" / ".." / "slides" / "s1.svs",
        tmp_path / "sheets" / "s2.tiff",
    ]


def test_extract_manifest_with_two_candidate_columns_names_both(tmp_path, capsys):
    sheet = tmp_path / "samples.csv"
    pd.DataFrame({"slide": ["a.svs"], "path": ["b.svs"]}).to_csv(sheet, index=False)
    assert main(["extract", str(sheet), "--cache-dir", str(tmp_path / "feats")]) != 0
    err = capsys.readouterr().err
    assert "slide, path" in err and "--slide-column" in err and "Traceback" not in err
    assert expand_slides([str(sheet)], "path") == [tmp_path / "b.svs"]
    with pytest.raises(DataError, match="no slide column 'wsi'"):
        expand_slides([str(sheet)], "wsi")


def test_load_samples_finds_the_slide_column_and_keeps_column_names(tmp_path):
    sheet = tmp_path / "s.csv"
    pd.DataFrame(
        {
            "Sample_ID": ["a", "b"],
            "patient_id": ["p", "q"],
            "cancer_type": ["X", "X"],
            "WSI": ["a.svs", "/abs/b.svs"],
            "MSI_Status": ["MSI", "MSS"],
        }
    ).to_csv(sheet, index=False)
    s = cohort.load_samples(sheet)
    assert list(s["slide"]) == [str(tmp_path / "a.svs"), "/abs/b.svs"]
    assert "MSI_Status" in s.columns  # as written, for --label-column
    assert cohort.find_column(s.columns, "MSI_Status", "the sheet") == "MSI_Status"
    assert cohort.find_column(s.columns, "msi_status", "the sheet") == "MSI_Status"
    with pytest.raises(DataError, match="no label column 'label'"):
        cohort.find_column(s.columns, "label", "the sheet", "label column")


class _Recorder:
    """Stands in for argparse's sub-parsers: keeps each command's parser by name."""

    def __init__(self) -> None:
        self.parsers: dict[str, argparse.ArgumentParser] = {}

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        kwargs.pop("help", None)
        self.parsers[name] = argparse.ArgumentParser(prog=f"he2rna {name}", **kwargs)
        return self.parsers[name]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from napari_he2rna.cli import COMMAND_MODULES

    rec = _Recorder()
    for name in COMMAND_MODULES:
        importlib.import_module(f"napari_he2rna.commands.{name}").register(rec)
    return rec.parsers


def test_help_of_every_command_shows_one_spelling_of_the_cache_folder():
    commands = _subcommands()
    with_cache = set()
    for name, sub in commands.items():
        text = sub.format_help()
        assert "--features-dir" not in text, name
        if "--cache-dir" in text:
            with_cache.add(name)
    assert {"train", "evaluate", "represent", "transfer", "slide-ex", "spatialize", "predict", "extract"} <= (
        with_cache
    )
    old = commands["train"].parse_args(
        ["--samples", "s", "--expression", "e", "--out", "o", "--features-dir", "F"]
    )
    assert old.cache_dir == "F"  # the old spelling is a hidden alias for one release


def test_inline_gene_sets_resolve_like_the_model_dock():
    genes = ["CD3D", "CD3E", "MKI67"]
    assert gene_sets.resolve_names(genes, ["CD3D+CD3E"]) == {"CD3D+CD3E": ["CD3D", "CD3E"]}
    assert gene_sets.resolve_names(genes, ["T=cd3d+CD3E", "MKI67"]) == {
        "T": ["CD3D", "CD3E"],
        "MKI67": ["MKI67"],
    }
    with pytest.warns(gene_sets.PartialGeneSetWarning, match="CD3G"):
        assert gene_sets.resolve_names(genes, ["CD3D+CD3G"]) == {"CD3D+CD3G": ["CD3D"]}
