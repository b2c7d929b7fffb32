"""A slide's output set: the files ``spatialize`` and ``predict`` write for one slide into a folder.

``--overwrite`` replaces a slide's whole set: the files of an earlier run that the new one does not write
(another gene's heatmap, the GeoJSON of a run with ``--no-geojson``, the tile scores of a ``predict`` run
that writes none) are removed in the same commit as the new files are moved in
(:func:`napari_he2rna.safe_output.staged_folder`'s ``replaces``), so a folder never holds two runs' files of
one slide. Only files by the names these commands give are ever touched: the fixed names of
:func:`~napari_he2rna.maps.spatialize.output_paths` and :func:`prediction_path`, and the heatmap PNGs that
he2rna drew for that slide (their PNG title says so); other files of the user stay. No Qt, no napari.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from .spatialize import output_paths

#: :func:`~napari_he2rna.maps.heatmaps.render_heatmap_png` titles a PNG ``"<name> — <slide file name>"``.
HEATMAP_TITLE_SEPARATOR = " — "


def prediction_path(slide: str | os.PathLike, out: str | os.PathLike) -> Path:
    """``he2rna predict``'s slide-level table: ``<out>/<slide stem>_prediction.csv``."""
    return Path(out) / f"{Path(slide).stem}_prediction.csv"


def slide_outputs(slide: str | os.PathLike, out: str | os.PathLike) -> list[Path]:
    """The files of ``slide``'s output set now in the folder ``out`` (none when it is not a folder).

    The tile scores (CSV, slide-level CSV, JSON metadata), the AnnData and GeoJSON tiles, ``predict``'s
    slide-level table, and the heatmap PNGs ``<stem>_<name>.png`` that he2rna drew for a slide of that stem.
    """
    out = Path(out)
    if not out.is_dir():
        return []
    paths = output_paths(slide, [], out, geojson=True)
    fixed = [paths[k] for k in ("csv", "slide_csv", "metadata", "h5ad", "geojson")]
    found = [p for p in [*fixed, prediction_path(slide, out)] if p.is_file()]
    stem = Path(slide).stem
    pngs = sorted(out.glob(f"{glob.escape(stem)}_*.png"))
    return found + [p for p in pngs if p.is_file() and is_heatmap_of(p, stem)]


def is_heatmap_of(path: str | os.PathLike, stem: str) -> bool:
    """Whether ``path`` is a heatmap PNG that he2rna drew for a slide whose file name has this stem."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            title = image.text.get("Title", "") if image.format == "PNG" else ""
    except Exception:  # not a PNG one can read: not one of ours
        return False
    _, sep, slide_name = str(title).rpartition(HEATMAP_TITLE_SEPARATOR)
    return bool(sep) and Path(slide_name).stem == stem
