"""Saving a table of the Compare dock as CSV: where (a dialog, or a given path confirmed before replacing a
file) and the write itself (atomic; errors and the written path as notifications)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog, QMessageBox, QWidget

from ..errors import He2rnaError
from ..maps import exports


def ask_csv_path(
    parent: QWidget, path: str | Path | None, title: str, default: str
) -> tuple[Path | None, bool]:
    """(path, overwrite): a dialog when ``path`` is None (Qt asks before replacing a file)."""
    if path is None:
        chosen, _ = QFileDialog.getSaveFileName(parent, title, default, "CSV (*.csv);;All files (*)")
        return (Path(chosen), True) if chosen else (None, False)
    path = Path(path)
    if path.exists():
        answer = QMessageBox.question(
            parent, title, f"{path.name} already exists. Replace it?", QMessageBox.Yes | QMessageBox.No
        )
        return (path, True) if answer == QMessageBox.Yes else (None, False)
    return path, False


def write_csv(df: pd.DataFrame, path: Path, overwrite: bool) -> Path | None:
    """Write ``df`` to ``path`` (no index); the path written, or None after an error notification."""
    try:
        out = exports.atomic_write(path, lambda tmp: df.to_csv(tmp, index=False), overwrite=overwrite)
    except He2rnaError as exc:
        show_error(str(exc))
        return None
    show_info(f"Wrote {out}.")
    return out
