"""The Compare dock's truth layer: Points (cells), Shapes (annotation outlines) or Image (mask), in µm.

What is drawn comes from a :class:`~napari_he2rna.comparison.Comparison` (the selected cells, the polygon
rings and their roles, the mask and its placement), the same object and geometry the per-tile numbers come
from; this module only turns it into napari layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..validation import truth
from ..validation.comparison import Comparison

#: Edge colour of an annotation outline by its role in the comparison.
ROLE_COLOURS = {"inside": "red", "outside": "cyan", "other": "gray"}
LAYER_TYPES = {"cells": "points", "annotations": "shapes", "mask": "image"}


def outline_paths(rings_um: list[np.ndarray], tolerance_um: float = 1.0) -> list[np.ndarray]:
    """Closed (y, x) µm outlines for a Shapes layer, simplified to ``tolerance_um`` for drawing only.

    napari triangulates every polygon's fill even when it is transparent (seconds for a few thousand
    vertices, minutes for a detailed QuPath tumour outline), so annotations are drawn as closed paths;
    the metrics use the full polygons, holes included.
    """
    out = []
    for ring in rings_um:
        ring = np.asarray(ring, dtype=float)
        closed = ring if np.array_equal(ring[0], ring[-1]) else np.vstack([ring, ring[:1]])
        if truth.shapely is not None and len(closed) > 8:
            simple = truth.shapely.simplify(truth.shapely.LineString(closed), tolerance_um)
            closed = np.asarray(simple.coords, dtype=float)
        out.append(closed)
    return out


def show_truth_layer(viewer: Any, comparison: Comparison, layer: Any, **kwargs: Any) -> Any:
    """(Re)draw the comparison's truth in ``viewer``, reusing ``layer`` when it can; returns the layer.

    ``kwargs`` (``name``, ``metadata``, ``units``) go to the new layer. The layer is styled and placed
    (:func:`style_truth_layer`, :func:`place_truth_layer`).
    """
    kind = comparison.kind
    if layer is not None and layer not in viewer.layers:
        layer = None
    if layer is not None and (
        type(layer).__name__.lower() != LAYER_TYPES[kind]
        or layer.metadata.get("source") != kwargs.get("metadata", {}).get("source")
    ):
        viewer.layers.remove(layer)
        layer = None
    mpp = comparison.mpp
    if kind == "cells":
        pts = comparison.points_um()
        if layer is None:
            # ~ a lymphocyte's size in µm, so the dots sit on the nuclei at full zoom
            layer = viewer.add_points(
                pts,
                size=6.0,
                face_color="yellow",
                border_color="yellow",
                border_width=0,
                opacity=0.8,
                **kwargs,
            )
        else:
            layer.data = pts
    elif kind == "annotations":
        shapes = outline_paths(comparison.outlines_um())
        if layer is not None:
            viewer.layers.remove(layer)
        layer = viewer.add_shapes(shapes or None, shape_type="path", edge_width=max(4 * mpp, 2.0), **kwargs)
    else:
        if layer is not None:
            viewer.layers.remove(layer)
        layer = viewer.add_image(
            comparison.mask_image(),
            colormap="green",
            blending="additive",
            opacity=0.5,
            contrast_limits=(0, 1),
            **kwargs,
        )
    style_truth_layer(layer, comparison)
    place_truth_layer(layer, comparison)
    return layer


def style_truth_layer(layer: Any, comparison: Comparison) -> None:
    """Colour annotation outlines by role: inside red, outside cyan, others grey."""
    if comparison.kind != "annotations" or layer is None or not len(layer.data):
        return
    layer.edge_color = [ROLE_COLOURS[r] for r in comparison.polygon_roles()]


def place_truth_layer(layer: Any, comparison: Comparison) -> None:
    """Put the truth layer where the comparison's alignment (and, for a mask, its geometry) says."""
    if comparison.kind == "mask":
        scale, translate = comparison.mask_placement()
        layer.scale = scale
        layer.translate = translate
    layer.affine = comparison.layer_affine()
