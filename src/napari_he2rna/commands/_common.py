"""Options several sub-commands share, declared once so that their spelling and help never drift apart."""

from __future__ import annotations

import argparse


def add_expression_format_arguments(p: argparse.ArgumentParser) -> None:
    """``--expression-scale`` and ``--genes-as-rows``: how to read an expression table."""
    p.add_argument(
        "--expression-scale",
        choices=["auto", "raw", "log"],
        default="auto",
        help="raw FPKM-UQ (log10(1+x) applied), already log, or auto (raw if any value > 50)",
    )
    p.add_argument("--genes-as-rows", action="store_true", help="the expression table is genes x samples")


def add_overwrite_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (refused otherwise)")


def refuse_existing(paths, overwrite: bool) -> None:
    """Stop before any work when an output a command would write is already there, unless ``overwrite``.

    ``paths``: the files the command writes (a folder's outputs are named by their key files, so that an
    existing folder with other content is fine). Raises :class:`~napari_he2rna.errors.DataError` naming
    the first one found.
    """
    from pathlib import Path

    from ..errors import DataError

    if overwrite:
        return
    for p in paths:
        if p is not None and Path(p).exists():
            raise DataError(f"{p} exists; pass --overwrite to replace it (nothing was written).")
