"""The Compare dock's truth layer: Points (cells), Shapes (annotation outlines) or Image (mask), in µm.

What is drawn comes from a :class:`~napari_he2rna.validation.comparison.Comparison` (the selected cells, the
polygon
rings and their roles, the mask and its placement), the same object and geometry the per-tile numbers come
from; this module only turns it into napari layers.

The truth is drawn over the heatmap so both are seen: cells as small semi-transparent dots (a lymphocyte
nucleus is about 5-7 µm, so at full zoom a dot sits on its nucleus and leaves the tile's colour around
it), and the layer that was active (the heatmap) stays active, so hovering still gives the tile's scores
and its truth.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..validation import geojson
from ..validation.comparison import Comparison

#: Edge colour of an annotation outline by its role in the comparison.
ROLE_COLOURS = {"inside": "red", "outside": "cyan", "other": "gray"}
LAYER_TYPES = {"cells": "points", "annotations": "shapes", "mask": "image"}
#: Diameter of a truth cell's dot, µm (the layer is in µm), its colour (one that neither the heatmaps'
#: magma nor H&E has) and the truth layers' opacity.
CELL_SIZE_UM = 4.0
CELL_COLOUR = "lime"
TRUTH_OPACITY = 0.5


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
        if geojson.shapely is not None and len(closed) > 8:
            simple = geojson.shapely.simplify(geojson.shapely.LineString(closed), tolerance_um)
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
    active = viewer.layers.selection.active  # the heatmap: it stays active (see the module docstring)
    if kind == "cells":
        pts = comparison.points_um()
        if layer is None:
            layer = viewer.add_points(
                pts,
                size=CELL_SIZE_UM,
                face_color=CELL_COLOUR,
                border_color=CELL_COLOUR,
                border_width=0,
                opacity=TRUTH_OPACITY,
                canvas_size_limits=(1, 10_000),  # zoomed out, a 1-px dot per cell: the tiles stay seen
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
            opacity=TRUTH_OPACITY,
            contrast_limits=(0, 1),
            **kwargs,
        )
    style_truth_layer(layer, comparison)
    place_truth_layer(layer, comparison)
    if active is not None and active in viewer.layers and viewer.layers.selection.active is not active:
        viewer.layers.selection.active = active
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
