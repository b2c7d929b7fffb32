"""``he2rna view``: open napari with a slide loaded and the plugin's panel (its widgets as tabs) docked."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "view",
        help="open napari with the slide and the napari-he2rna widgets",
        description=(
            "Open the napari viewer with a slide loaded (lazy pyramid, in µm) and the plugin's widgets "
            "docked as tabs of one panel. When napari has no saved window geometry (a first launch), the "
            "window takes the screen and the canvas most of it. Needs a display and a Qt binding "
            "(pip install 'napari-he2rna[viewer]')."
        ),
    )
    p.add_argument("slide", nargs="?", default=None, help="whole-slide image to open (optional)")
    p.add_argument("--mpp", type=float, default=None, help="µm per level-0 pixel, if the slide does not say")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..napari.viewer import run_viewer  # the napari face: only napari/ imports napari and Qt

    run_viewer(args.slide, args.mpp)
    return 0
