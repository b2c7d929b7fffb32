"""Per-tile scores and slide-level predictions of genes and gene sets.

HE2RNA's spatialization skips the top-k aggregation: the score of a tile for a gene is the model's predicted
expression for that tile alone (units of the training target, ``log10(1 + FPKM-UQ)``). A gene set scores the
mean of its genes. Names are resolved by :mod:`napari_he2rna.maps.gene_sets`. Plain NumPy/pandas: no Qt, no
napari.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import He2rnaError
from .gene_sets import resolve_names

if TYPE_CHECKING:  # only for type hints
    from ..model.bundle import ModelBundle

#: Units of every tile score and slide prediction (the HE2RNA training target).
SCORE_UNITS = "predicted log10(1+FPKM-UQ)"


def _needed_genes(resolved: Mapping[str, Sequence[str]]) -> list[str]:
    return list(dict.fromkeys(g for genes in resolved.values() for g in genes))


def score_resolved(
    bundle: ModelBundle, features: np.ndarray, resolved: Mapping[str, Sequence[str]]
) -> pd.DataFrame:
    """Per-tile scores of already resolved names (``name -> model genes``, see :func:`resolve_names`).

    Calls ``bundle.tile_scores`` once, for the union of the genes needed, never for all the model's genes.

    Returns
    -------
    pandas.DataFrame
        (N, len(resolved)) float32, one column per name, RangeIndex aligned with ``grid.table`` rows.
    """
    needed = _needed_genes(resolved)
    raw = np.asarray(bundle.tile_scores(features, needed), dtype=np.float32)
    if raw.ndim != 2 or raw.shape[1] != len(needed):
        raise He2rnaError(
            f"the model returned tile scores of shape {raw.shape}, expected (N, {len(needed)})."
        )
    col = {g: i for i, g in enumerate(needed)}
    data = {name: raw[:, [col[g] for g in genes]].mean(axis=1) for name, genes in resolved.items()}
    return pd.DataFrame(data, index=pd.RangeIndex(raw.shape[0]), dtype=np.float32)


def predict_resolved(
    bundle: ModelBundle,
    features: np.ndarray,
    resolved: Mapping[str, Sequence[str]],
    positions: np.ndarray | None = None,
) -> pd.Series:
    """Slide-level predictions of already resolved names; a set is the mean of its genes' predictions.
    ``positions``: the tile centres (level-0 px), which a model trained on supertiles needs."""
    needed = _needed_genes(resolved)
    raw = np.asarray(bundle.slide_prediction(features, needed, positions), dtype=np.float64).reshape(-1)
    col = {g: i for i, g in enumerate(needed)}
    values = {name: float(raw[[col[g] for g in genes]].mean()) for name, genes in resolved.items()}
    return pd.Series(values, name="slide_prediction", dtype=np.float64)


def score_tiles(
    bundle: ModelBundle,
    features: np.ndarray,
    names: Iterable[str],
    gene_sets: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Per-tile scores of genes and gene sets, computed only for the genes needed.

    Parameters
    ----------
    bundle
        A loaded model (``genes`` and ``tile_scores(features, genes) -> (N, G)``).
    features
        (N, dim) float features of the grid's tiles, in ``grid.table`` row order.
    names
        Gene symbols and/or set names (see :func:`resolve_names`).
    gene_sets
        Extra user-defined sets.

    Returns
    -------
    pandas.DataFrame
        (N, len(names)) float32, one column per canonical name, rows aligned with ``grid.table`` rows
        (RangeIndex). A set's column is the mean of its genes' tile scores. Units: :data:`SCORE_UNITS`.
    """
    return score_resolved(bundle, features, resolve_names(bundle.genes, names, gene_sets))


def slide_predictions(
    bundle: ModelBundle,
    features: np.ndarray,
    names: Iterable[str],
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    positions: np.ndarray | None = None,
) -> pd.Series:
    """Slide-level predictions (HE2RNA top-k aggregation) of genes and gene sets (``positions``: the tile
    centres, level-0 px, for a model trained on supertiles).

    Returns
    -------
    pandas.Series
        float, indexed by canonical name; a set is the mean of its genes' slide predictions.
        Units: :data:`SCORE_UNITS`.
    """
    return predict_resolved(bundle, features, resolve_names(bundle.genes, names, gene_sets), positions)
