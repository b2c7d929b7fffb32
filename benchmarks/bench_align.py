"""Accuracy and time of ``he2rna align`` (napari_he2rna.validation.align) on real and synthetic H&E/IHC pairs.

Pairs:

- the ANHIR rat-kidney consecutive sections (H&E and pan-cytokeratin, 69 matched landmarks) in
  ``../shared/data/he_ihc_pairs``;
- synthetic pairs built from real H&E images by
  :func:`napari_he2rna.validation.synthetic_sections.synthetic_pair`: the image is restained as a
  DAB/haematoxylin IHC (another haematoxylin hue, eosin dropped, DAB blobs, blur, noise) and moved by a known
  affine (rotation, anisotropic scale, shear, shift); 50 landmarks are drawn on the tissue.

For each pair: the median and maximum landmark error as a fraction of the fixed image's diagonal (ANHIR's
rTRE) and in px, before and after alignment, and the wall and CPU time of the alignment itself (reading the
two image files included). Run from the repository root::

    python benchmarks/bench_align.py [--data ../shared/data] [--out benchmarks/results/align.csv]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from napari_he2rna.errors import He2rnaError
from napari_he2rna.validation import align
from napari_he2rna.validation.landmarks import landmark_errors, match_landmarks, read_landmarks
from napari_he2rna.validation.synthetic_sections import synthetic_pair

REPO = Path(__file__).resolve().parents[1]
MOTIONS = {
    "rot25 s1.04 shear0.03": dict(rotation_deg=25.0, scale=1.04, shear=0.03),
    "rot-110 s(0.93,0.97)": dict(rotation_deg=-110.0, scale=(0.93, 0.97), shear=-0.02),
    "rot180": dict(rotation_deg=180.0, scale=1.0),
}
SOURCES = {
    "rat kidney H&E": "he_ihc_pairs/Rat-Kidney_HE.jpg",
    "TCGA lung thumbnail": "thumbnails/tcga-lung-rgb.png",
    "CMU-1 region (1/4)": "slides/cmu-1-small-region.svs",
    "tiatoolbox region": "he_regions/tiatoolbox_target_image.png",
}


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _row(name, fixed_dims, f_xy, m_xy, fn) -> dict:
    before = landmark_errors(np.eye(3), f_xy, m_xy, fixed_dimensions=fixed_dims)
    try:
        result, wall, cpu = _timed(fn)
    except He2rnaError as exc:
        return {"pair": name, "error": str(exc), "median_rtre_before": before["median_rtre"]}
    after = landmark_errors(result.affine_px, f_xy, m_xy, fixed_dimensions=fixed_dims)
    return {
        "pair": name,
        "median_rtre_before": before["median_rtre"],
        "median_rtre": after["median_rtre"],
        "max_rtre": after["max_rtre"],
        "median_px": after["median_px"],
        "max_px": after["max_px"],
        "similarity": result.similarity,
        "tissue_dice": result.tissue_dice,
        "wall_s": wall,
        "cpu_s": cpu,
        "error": "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as CSV")
    args = parser.parse_args()
    rows = []
    pairs = args.data / "he_ihc_pairs"
    fixed_lm = read_landmarks(pairs / "Rat-Kidney_HE.csv")
    moving_lm = read_landmarks(pairs / "Rat-Kidney_PanCytokeratin.csv")
    f_xy, m_xy = match_landmarks(fixed_lm, moving_lm)
    he, ihc = pairs / "Rat-Kidney_HE.jpg", pairs / "Rat-Kidney_PanCytokeratin.jpg"
    dims = Image.open(he).size
    rows.append(_row("ANHIR rat kidney H&E / pan-CK", dims, f_xy, m_xy, lambda: align.align_slides(he, ihc)))
    with tempfile.TemporaryDirectory() as tmp:
        for src_name, rel in SOURCES.items():
            from napari_he2rna.slides.slide import open_slide

            with open_slide(args.data / rel) as slide:
                w, h = slide.dimensions
                rgb = slide.thumbnail(max(w, h) // 4) if "1/4" in src_name else slide.thumbnail(max(w, h))
            fixed = Path(tmp) / "fixed.png"
            Image.fromarray(rgb).save(fixed)
            for i, (motion_name, motion) in enumerate(MOTIONS.items()):
                hh, ww = rgb.shape[:2]
                a = align.affine_from_parts(center_px=(ww / 2, hh / 2), **motion)
                moving_rgb, _, f_pts, m_pts = synthetic_pair(rgb, a, seed=i)
                moving = Path(tmp) / "moving.png"
                Image.fromarray(moving_rgb).save(moving)
                rows.append(
                    _row(
                        f"synthetic: {src_name}, {motion_name}",
                        (ww, hh),
                        f_pts,
                        m_pts,
                        lambda fixed=fixed, moving=moving: align.align_slides(fixed, moving),
                    )
                )
                print(rows[-1])
    table = pd.DataFrame(rows)
    with pd.option_context(
        "display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format
    ):
        print(table.to_string(index=False))
    if args.out is not None:
        table.to_csv(args.out, index=False, float_format="%.5g")


if __name__ == "__main__":
    main()
