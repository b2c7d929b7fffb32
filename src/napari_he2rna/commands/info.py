"""``he2rna info SLIDE``: print a slide's facts, optionally write a thumbnail with the tissue outline."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import MissingMPPError, TissueError
from ..slide import Slide, open_slide


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="print a slide's vendor, size, levels, pixel size and objective",
        description="Print a slide's facts; with --thumbnail, write a thumbnail with the tissue outline.",
    )
    parser.add_argument("slide", type=Path, help="the slide file (.svs, .ndpi, .tiff, OME-TIFF, .png, ...)")
    parser.add_argument("--mpp", type=float, default=None, help="pixel size in µm/px (overrides the file's)")
    parser.add_argument(
        "--thumbnail",
        type=Path,
        default=None,
        metavar="OUT.png",
        help="write the whole slide, shrunk, with the tissue outline drawn in green",
    )
    parser.add_argument(
        "--size", type=int, default=1024, help="the thumbnail's longer side in px (default 1024)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_slide(args.slide, mpp=args.mpp) as slide:
        for key, value in slide.facts().items():
            print(f"{key:>11}: {value}")
        try:
            slide.require_mpp()
        except MissingMPPError as exc:
            print(f"he2rna: warning: {exc}", file=sys.stderr)
        if args.thumbnail is not None:
            tissue = write_thumbnail(slide, args.thumbnail, max_size=args.size)
            print(f"  thumbnail: {args.thumbnail} ({tissue:.0%} tissue)")
    return 0


def _tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    try:
        from ..tiling import tissue_mask
    except ImportError:  # tiling.py not there: a plain Otsu on saturation does for an outline
        from skimage.color import rgb2hsv
        from skimage.filters import threshold_otsu

        saturation = rgb2hsv(thumbnail)[..., 1]
        return (
            saturation > threshold_otsu(saturation)
            if np.ptp(saturation) > 0
            else np.zeros_like(saturation, bool)
        )
    try:
        return tissue_mask(thumbnail)
    except TissueError:
        return np.zeros(thumbnail.shape[:2], dtype=bool)


def write_thumbnail(slide: Slide, out: Path, max_size: int = 1024) -> float:
    """Write the slide's thumbnail as PNG with the tissue outline in green, atomically.

    Returns
    -------
    float
        The tissue fraction of the thumbnail, in [0, 1].
    """
    from PIL import Image
    from skimage.segmentation import find_boundaries

    thumbnail = slide.thumbnail(max_size)
    mask = _tissue_mask(thumbnail)
    drawn = thumbnail.copy()
    outline = find_boundaries(mask, mode="thick")
    drawn[outline] = (0, 200, 0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        Image.fromarray(drawn).save(tmp, format="PNG")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return float(mask.mean())
