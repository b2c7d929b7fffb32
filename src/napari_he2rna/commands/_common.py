"""Options several sub-commands share, declared once so that their spelling and help never drift apart."""

from __future__ import annotations

import argparse

# Shared by every command that writes (one message, one check, before any work).
from ..safe_output import refuse_existing

__all__ = [
    "add_cache_dir_argument",
    "add_expression_format_arguments",
    "add_overwrite_argument",
    "add_slide_column_argument",
    "refuse_existing",
]


def add_slide_column_argument(p: argparse.ArgumentParser) -> None:
    """``--slide-column``: which column of a sample sheet or manifest holds the slide paths."""
    p.add_argument(
        "--slide-column",
        default=None,
        metavar="NAME",
        help="the sheet's column of slide paths (default: the one of slide, slide_path, path, file, "
        "file_name, filename, wsi, image it has; relative paths are relative to the sheet)",
    )


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


def add_cache_dir_argument(
    p: argparse.ArgumentParser, help: str | None = None, old: str = "--features-dir"
) -> None:
    """``--cache-dir``: the feature cache folder, one spelling in every command (``args.cache_dir``).

    ``old`` (the command's earlier spelling) stays accepted, hidden from ``--help``, for one release.
    """
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help=help or "feature cache folder ($HE2RNA_CACHE when not given)",
    )
    p.add_argument(old, dest="cache_dir", default=None, help=argparse.SUPPRESS)
