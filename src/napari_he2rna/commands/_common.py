"""Options several sub-commands share, declared once so that their spelling and help never drift apart."""

from __future__ import annotations

import argparse

# Shared by every command that writes (one message, one check, before any work).
from ..safe_output import refuse_existing

__all__ = ["add_expression_format_arguments", "add_overwrite_argument", "refuse_existing"]


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
