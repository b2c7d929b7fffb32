"""Pixel helpers shared by the slide backends: RGBA composited onto a background colour, a block painted with
one colour.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import numpy as np

__all__ = ["composite", "paint"]


def composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """(h, w, 4) uint8 RGBA (not premultiplied) -> (h, w, 3) uint8 RGB over ``background``.

    One copy of the RGB planes; the blend (in uint16) touches only the pixels that are not opaque, so a
    region inside the scan costs a copy and an alpha scan, nothing more.
    """
    out = np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3]
    if alpha.min() == 255:  # the common case inside the tissue scan
        return out
    where = alpha != 255
    a = alpha[where][:, None].astype(np.uint16)
    bg = np.asarray(background, dtype=np.uint16)
    out[where] = ((out[where].astype(np.uint16) * a + bg * (255 - a) + 127) // 255).astype(np.uint8)
    return out


def paint(out: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Paint an (h, w, c) uint8 block with one colour.

    ``out[...] = colour`` broadcasts a 3-vector pixel by pixel (1.6 ms for 512 x 512); one row painted, then
    copied row by row, runs at memory speed.
    """
    if out.size == 0:
        return
    out[0] = colour
    out[1:] = out[0]
