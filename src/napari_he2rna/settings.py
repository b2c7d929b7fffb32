"""Where things live: the feature cache, the bundled sample data and model."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """The feature cache folder: ``$HE2RNA_CACHE`` or ``~/.cache/napari-he2rna``."""
    env = os.environ.get("HE2RNA_CACHE")
    base = (
        Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "napari-he2rna"
    )
    return base.expanduser()


def sample_data_dir() -> Path:
    """The bundled sample cohort (slide, truth files, demo model)."""
    return PACKAGE_DIR / "sample_data"


def weights_dir() -> Path:
    """Folder for backbone weights downloaded by hand: ``$HE2RNA_WEIGHTS`` or ``<cache>/weights``."""
    env = os.environ.get("HE2RNA_WEIGHTS")
    return Path(env).expanduser() if env else cache_dir() / "weights"
