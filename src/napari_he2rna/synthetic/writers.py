"""Files of the sample cohort: the pyramidal TIFF, the truth files (QuPath tables, mask, GeoJSON) and the
SLIDE-EX targets; every file through :mod:`napari_he2rna.safe_output`."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ..safe_output import atomic_write, atomic_write_text, prepare_folder
from .biology import GENE_PANEL, celltype_targets
from .params import JPEG_QUALITY, MASK_DOWNSAMPLE, MPP, TIFF_TILE
from .truth import SlideTruth

# --- writers -----------------------------------------------------------------------------------------------


def write_table(path: Path, df: pd.DataFrame, sep: str, index: bool = False) -> None:
    """A table as CSV/TSV (``\\n`` line ends), written atomically
    (:func:`napari_he2rna.safe_output.atomic_write_text`)."""
    atomic_write_text(path, df.to_csv(sep=sep, index=index, lineterminator="\n"))


def _downsample2(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    if h % 2 or w % 2:
        img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return (
        img.reshape(img.shape[0] // 2, 2, img.shape[1] // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    )


def write_pyramid_tiff(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float = MPP,
    description: str = "",
    min_level_px: int = 512,
    quality: int = JPEG_QUALITY,
) -> Path:
    """Write (h, w, 3) uint8 as a generic tiled pyramidal TIFF with JPEG tiles, atomically.

    Levels are halved until the longer side is <= ``min_level_px``; each level is a top-level page
    (``subfiletype=1`` for reduced ones, which is what OpenSlide's generic-tiff reader wants), with resolution
    tags in centimetres so that OpenSlide reports ``openslide.mpp-x`` = ``mpp`` for level 0.
    """
    import tifffile

    path = Path(path)
    levels = [rgb]
    while max(levels[-1].shape[:2]) > min_level_px:
        levels.append(_downsample2(levels[-1]))

    def write(tmp: Path) -> None:
        with tifffile.TiffWriter(tmp) as tif:
            for i, level in enumerate(levels):
                ds = rgb.shape[1] / level.shape[1]
                res = 10000.0 / (mpp * ds)  # px per cm
                tif.write(
                    level,
                    tile=(TIFF_TILE, TIFF_TILE),
                    compression="jpeg",
                    compressionargs={"level": quality},
                    photometric="rgb",
                    subfiletype=0 if i == 0 else 1,
                    resolution=(res, res),
                    resolutionunit="CENTIMETER",
                    description=description if i == 0 else None,
                    metadata=None,
                    software="napari-he2rna",
                )

    atomic_write(path, write)
    return path


def _qupath_table(
    cells: pd.DataFrame,
    positive: str,
    image_name: str,
    mpp: float,
    tumor_ds: np.ndarray,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """A QuPath detection measurement export (0.4 style, ``Class`` column) for one IHC marker."""
    is_pos = (cells["type"] == positive).to_numpy()
    n = len(cells)
    ids = [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]
    gi = np.clip((cells["y"].to_numpy() / 2).astype(np.int64), 0, tumor_ds.shape[0] - 1)
    gj = np.clip((cells["x"].to_numpy() / 2).astype(np.int64), 0, tumor_ds.shape[1] - 1)
    in_tumor = tumor_ds[gi, gj]
    radius = cells["radius_um"].to_numpy()
    area = np.pi * radius**2 * (np.where(cells["type"] == "stromal", 0.64, 1.0))
    dab = np.where(is_pos, rng.uniform(0.25, 0.7, n), rng.uniform(0.01, 0.09, n))
    hema = rng.uniform(0.2, 0.6, n)
    return pd.DataFrame(
        {
            "Image": image_name,
            "Object ID": ids,
            "Object type": "Detection",
            "Name": "",
            "Class": np.where(is_pos, "Positive", "Negative"),
            "Parent": np.where(in_tumor, "Tumor", "Annotation"),
            "ROI": "Polygon",
            "Centroid X µm": np.round(cells["x"].to_numpy() * mpp, 2),
            "Centroid Y µm": np.round(cells["y"].to_numpy() * mpp, 2),
            "Nucleus: Area µm^2": np.round(area, 2),
            "Nucleus: Hematoxylin OD mean": np.round(hema, 4),
            "DAB: Mean": np.round(dab, 4),
        }
    )


def _geojson(polygons: list[list[np.ndarray]], rng: np.random.Generator) -> dict:
    feats = []
    for poly in polygons:
        feats.append(
            {
                "type": "Feature",
                "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                "geometry": {"type": "Polygon", "coordinates": [ring.tolist() for ring in poly]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    "isLocked": False,
                },
            }
        )
    return {"type": "FeatureCollection", "features": feats}


def truth_paths(slide_id: str, truth_dir: str | Path) -> dict[str, Path]:
    """Where the truth files of ``slide_id`` live."""
    d = Path(truth_dir)
    return {
        "tiles": d / f"{slide_id}_tiles.csv",
        "cells": d / f"{slide_id}_cells.csv",
        "CD3": d / f"{slide_id}_CD3.tsv",
        "CD20": d / f"{slide_id}_CD20.tsv",
        "epithelium_mask": d / f"{slide_id}_epithelium_mask.png",
        "epithelium_mask_json": d / f"{slide_id}_epithelium_mask.json",
        "tumor": d / f"{slide_id}_tumor.geojson",
    }


def write_truth_files(
    truth: SlideTruth, truth_dir: Path, tumor_ds: np.ndarray, rng: np.random.Generator
) -> None:
    """Write the truth files of a slide (:func:`truth_paths`) into ``truth_dir``; the IHC cell ids and the
    GeoJSON ids are drawn from ``rng`` (after the slide itself)."""
    from PIL import Image

    prepare_folder(truth_dir)
    paths = truth_paths(truth.slide_id, truth_dir)
    write_table(paths["tiles"], truth.tiles, ",")
    cells = truth.cells.copy()
    cells["x"] = cells["x"].round(3)
    cells["y"] = cells["y"].round(3)
    cells["radius_um"] = cells["radius_um"].round(2)
    cells["proliferating"] = cells["proliferating"].astype(int)
    write_table(paths["cells"], cells, ",")
    image_name = truth.path.name
    for marker, ctype in (("CD3", "T cell"), ("CD20", "B cell")):
        write_table(
            paths[marker], _qupath_table(truth.cells, ctype, image_name, truth.mpp, tumor_ds, rng), "\t"
        )
    mask = Image.fromarray(truth.epithelium_mask.astype(np.uint8) * 255)
    atomic_write(paths["epithelium_mask"], lambda tmp: mask.save(tmp, format="PNG"))
    side = {
        "slide": image_name,
        "downsample": MASK_DOWNSAMPLE,
        "mpp": truth.mpp * MASK_DOWNSAMPLE,
        "slide_dimensions": list(truth.dimensions),
        "positive_value": 255,
        "meaning": "epithelium (tumour nests); pixel (i, j) covers level-0 px [8j, 8j+8) x [8i, 8i+8)",
    }
    atomic_write_text(paths["epithelium_mask_json"], json.dumps(side, indent=1))
    atomic_write_text(paths["tumor"], json.dumps(_geojson(truth.tumor_polygons, rng)))
    truth.files.update(paths)


def write_celltype_targets(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the cell-type-resolved targets of the cohort in ``out_dir`` (from its ``cell_abundance.tsv``).

    Files: ``celltype_expression/<cell type>.tsv`` (samples x genes), ``celltype_abundance.tsv`` (samples x
    cell types) and ``responders.tsv`` (sample_id, patient_id, responder 0/1). Works on cohorts made before
    these files existed.
    """
    out = Path(out_dir)
    abundance = pd.read_csv(out / "cell_abundance.tsv", sep="\t", index_col=0)
    abundance.index = abundance.index.astype(str)
    samples = pd.read_csv(out / "samples.tsv", sep="\t", dtype={"sample_id": str, "patient_id": str})
    pid = samples.set_index("sample_id").loc[abundance.index, "patient_id"].tolist()
    tables, frac, responder = celltype_targets(abundance, seed, pid)
    prepare_folder(out / "celltype_expression")
    paths: dict[str, Path] = {}
    for ct, tab in tables.items():
        paths[ct] = out / "celltype_expression" / f"{ct}.tsv"
        atomic_write_text(paths[ct], tab.to_csv(sep="\t", lineterminator="\n"))
    paths["celltype_abundance"] = out / "celltype_abundance.tsv"
    atomic_write_text(paths["celltype_abundance"], frac.round(6).to_csv(sep="\t", lineterminator="\n"))
    resp = pd.DataFrame({"sample_id": responder.index, "patient_id": pid, "responder": responder.to_numpy()})
    paths["responders"] = out / "responders.tsv"
    write_table(paths["responders"], resp, "\t")
    return paths


# --- which genes are planted -------------------------------------------------------------------------------

#: driver signal of :data:`GENE_PANEL` -> the name ``genes.tsv`` gives it
DRIVER_NAMES = {
    "t_density": "T cells",
    "b_density": "B cells",
    "epithelium": "epithelium",
    "proliferating_density": "proliferation",
    "stroma": "stroma",
    "fat": "fat",
}
#: drivers a model cannot see: fat is not tissue, so the tissue mask drops the tiles that show it
INVISIBLE_DRIVERS = frozenset({"fat"})


def gene_roles_table(controls: Iterable[str]) -> pd.DataFrame:
    """The role of every gene of a cohort, one row per gene: ``gene``; ``role``, ``planted`` for
    :data:`GENE_PANEL` and ``control`` for the noise-only ``controls`` (names as
    :func:`.biology.control_genes` gives them); ``driver`` (:data:`DRIVER_NAMES`, ``noise`` for a control);
    ``visible``, True when the driver is drawn in tissue that the tiles keep (not fat, which the tissue mask
    drops, and not noise)."""
    rows = [
        {
            "gene": gene,
            "role": "planted",
            "driver": DRIVER_NAMES[driver],
            "visible": driver not in INVISIBLE_DRIVERS,
        }
        for gene, (driver, *_rest) in GENE_PANEL.items()
    ]
    rows += [{"gene": gene, "role": "control", "driver": "noise", "visible": False} for gene in controls]
    return pd.DataFrame(rows, columns=["gene", "role", "driver", "visible"])


def write_gene_roles(path: Path, controls: Iterable[str]) -> Path:
    """Write :func:`gene_roles_table` as ``genes.tsv`` (what ``he2rna evaluate --gene-roles`` reads)."""
    table = gene_roles_table(controls)
    table["visible"] = table["visible"].map({True: "yes", False: "no"})
    write_table(path, table, "\t")
    return path
