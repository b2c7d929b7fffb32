"""``he2rna align``: register an IHC slide (moving) onto its H&E slide (fixed); the transform as JSON.

::

    he2rna align HE.svs IHC.svs --out transform.json [--mpp-fixed X --mpp-moving Y]
        [--landmarks-fixed HE.csv --landmarks-moving IHC.csv]

The JSON holds ``affine_px`` (3x3, moving level-0 px (x, y, 1) -> fixed level-0 px), ``affine_um`` (the
same between µm), ``flipped`` (the IHC section lay face-down: the matrix mirrors it), the pixel sizes, the
method and the similarity reached; ``he2rna compare --transform transform.json`` maps the IHC's QuPath export
onto the H&E with it. With landmarks (ANHIR/BIRL CSV, ``.pts``, QuPath points) the median and maximum
landmark error are printed in µm and as a fraction of the fixed image's diagonal (rTRE) and stored in the
JSON. Bad options, landmark files and an unusable ``--out`` are refused before the work; a failed alignment
(no tissue, similarity too low) is one sentence and exit code 2; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ..errors import DataError
from ..safe_output import OutputError, prepare_folder
from ._common import add_overwrite_argument, refuse_existing


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "align",
        help="align an IHC slide (moving) onto its H&E slide (fixed): affine transform as JSON",
        description=(
            "Register the MOVING slide (e.g. an IHC consecutive section, or the image its QuPath export was "
            "drawn on) onto the FIXED slide (the H&E) on low-resolution images of both: haematoxylin "
            "channel, tissue masks, a search over rotations of the section as scanned and mirrored (mounted "
            "face-down), then a similarity and an affine refinement by mutual information (SimpleITK). "
            "Writes the 3x3 moving-to-fixed level-0 pixel affine ('affine_px'), the same in µm "
            "('affine_um') and whether it mirrors ('flipped'). Plain JPEG/PNG images are accepted as slides."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("fixed", type=Path, help="the H&E slide (the heatmaps' slide)")
    p.add_argument("moving", type=Path, help="the IHC slide to map onto it")
    p.add_argument("--out", type=Path, required=True, help="transform JSON to write")
    p.add_argument("--mpp-fixed", type=float, default=None, help="µm per level-0 px of FIXED (overrides)")
    p.add_argument("--mpp-moving", type=float, default=None, help="µm per level-0 px of MOVING (overrides)")
    p.add_argument(
        "--max-side",
        type=_checked("check_max_side"),
        default=512,
        help="working resolution: FIXED's longer side in px",
    )
    p.add_argument(
        "--rotation-step",
        type=_checked("check_rotation_step"),
        default=15.0,
        help="spacing of the initial rotations tried, degrees (360: none)",
    )
    p.add_argument("--no-affine", action="store_true", help="stop at rotation + one scale + shift")
    p.add_argument("--landmarks-fixed", type=Path, help="landmarks on FIXED (ANHIR CSV, .pts, QuPath points)")
    p.add_argument("--landmarks-moving", type=Path, help="the matching landmarks on MOVING")
    add_overwrite_argument(p)
    p.set_defaults(func=run)


def _checked(name: str):
    """An argparse ``type`` from the check ``validation.align.<name>`` (imported on use, not by ``--help``):
    the check's :class:`DataError` sentence becomes argparse's error for the option."""

    def convert(text: str):
        from ..validation import align

        try:
            return getattr(align, name)(text)
        except DataError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name.removeprefix("check_").replace("_", " ")
    return convert


def _check_out(path: Path, overwrite: bool) -> None:
    """Before the work: ``--out`` must be a file name whose folder exists or can be made, and is writable."""
    refuse_existing([path], overwrite)
    if path.is_dir():
        raise OutputError(f"--out {path} is a folder; give the transform's file name, e.g. {path}/t.json.")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # a missing folder is made after the work
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: {folder} is a file, not a folder; choose another --out.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".he2rna-probe-", dir=folder)
    except OSError as exc:
        raise OutputError(
            f"cannot write {path}: the folder {folder} is not writable ({exc.strerror or exc}); choose "
            "another --out."
        ) from None
    os.close(fd)
    os.unlink(probe)


def _fmt_um(value) -> str:
    return "—" if value is None else f"{value:.1f} µm"


def run(args: argparse.Namespace) -> int:
    from ..jobs import TextProgress
    from ..validation import align
    from ..validation.landmarks import landmark_errors, match_landmarks, read_landmarks

    _check_out(args.out, args.overwrite)
    if (args.landmarks_fixed is None) != (args.landmarks_moving is None):
        raise DataError("give both --landmarks-fixed and --landmarks-moving, or neither.")
    landmarks = None
    if args.landmarks_fixed is not None:  # read before the work: a bad file fails fast
        landmarks = match_landmarks(
            read_landmarks(args.landmarks_fixed), read_landmarks(args.landmarks_moving)
        )
    result = align.align_slides(
        args.fixed,
        args.moving,
        mpp_fixed=args.mpp_fixed,
        mpp_moving=args.mpp_moving,
        max_side=args.max_side,
        rotation_step_deg=args.rotation_step,
        affine=not args.no_affine,
        progress=TextProgress("align") if sys.stderr.isatty() else None,
    )
    print(f"aligned {args.moving.name} onto {args.fixed.name}: {result.summary()}")
    if landmarks is not None:
        f_xy, m_xy = landmarks
        kw = {"fixed_dimensions": result.fixed_dimensions, "mpp_fixed": result.mpp_fixed}
        before = landmark_errors([[1, 0, 0], [0, 1, 0], [0, 0, 1]], f_xy, m_xy, **kw)
        after = landmark_errors(result.affine_px, f_xy, m_xy, **kw)
        result.landmarks = {"unaligned": before, "aligned": after}
        print(
            f"landmarks ({after['n']} matched): median error {_fmt_um(after['median_um'])} "
            f"(rTRE {after['median_rtre']:.4f}), max {_fmt_um(after['max_um'])} "
            f"(rTRE {after['max_rtre']:.4f}); "
            f"unaligned: median rTRE {before['median_rtre']:.4f}, max {before['max_rtre']:.4f}"
        )
    prepare_folder(args.out.parent)
    prepare_folder(args.out.parent)
    result.write(args.out, overwrite=args.overwrite)
    print(f"transform: {args.out}")
    return 0
