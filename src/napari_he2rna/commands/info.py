"""``he2rna info SLIDE``: print a slide's facts, optionally write a thumbnail with the tissue outline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import MissingMPPError, TissueError
from ..safe_output import atomic_write, prepare_folder, refuse_existing
from ._common import add_overwrite_argument

if TYPE_CHECKING:
    from ..slides.slide import Slide


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
    add_overwrite_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.thumbnail is not None:  # before the slide is read
        refuse_existing([args.thumbnail], args.overwrite)
        prepare_folder(Path(args.thumbnail).parent, "thumbnail's folder")
    from ..slides.slide import open_slide  # on use: the reader's libraries (dask, scipy) take ~1 s to import

    with open_slide(args.slide, mpp=args.mpp) as slide:
        for key, value in slide.facts().items():
            print(f"{key:>11}: {value}")
        try:
            slide.require_mpp()
        except MissingMPPError as exc:
            print(f"he2rna: warning: {exc}", file=sys.stderr)
        if args.thumbnail is not None:
            tissue = write_thumbnail(slide, args.thumbnail, max_size=args.size, overwrite=args.overwrite)
            print(f"  thumbnail: {args.thumbnail} ({tissue:.0%} tissue)")
    return 0


def _tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    try:
        from ..slides.tiling import tissue_mask
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


def write_thumbnail(slide: Slide, out: Path, max_size: int = 1024, overwrite: bool = False) -> float:
    """Write the slide's thumbnail as PNG with the tissue outline in green, atomically.

    An existing ``out`` is replaced only with ``overwrite``; the file gets the user's umask mode.

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
    out = prepare_folder(Path(out).parent, "thumbnail's folder") / Path(out).name
    atomic_write(out, lambda tmp: Image.fromarray(drawn).save(tmp, format="PNG"), overwrite=overwrite)
    return float(mask.mean())
