"""Slide-level predictions of fold models over a cohort.

:class:`SlideBatches` pads and masks the feature matrices of many slides into batches, :func:`predict_slides`
runs one fold model over them, and :func:`bundle_oof_predictions` recovers the out-of-fold predictions of a
saved fold ensemble on its training cohort (each sample predicted by the fold model that did not see it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import closing
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..errors import DataError
from ..features.devices import resolve_device
from .network import HE2RNA, topk_mean_multi
from .prefetch import iter_batches

if TYPE_CHECKING:
    from ..cohorts.cohort import Cohort
    from .bundle import ModelBundle


class SlideBatches:
    """Feature matrices by position, loaded once (supertiles) or on demand (all tiles), batched and padded.

    Parameters
    ----------
    features
        ``sample_id -> (n_tiles, dim)`` arrays (any mapping; lazy ones are read per batch).
    ids
        The samples, by position.
    keep_in_memory
        Keep each matrix after its first read (supertiles: small).
    """

    def __init__(self, features: Mapping[str, np.ndarray], ids: Sequence[str], keep_in_memory: bool) -> None:
        self.features, self.ids, self.keep = features, list(ids), keep_in_memory
        self._cache: dict[int, np.ndarray] = {}
        self._checked: set[int] = set()  # values checked finite once (a store is checked when opened)
        self.dim: int | None = None

    def get(self, i: int) -> np.ndarray:
        if i in self._cache:
            return self._cache[i]
        sid = self.ids[i]
        try:
            arr = np.asarray(self.features[sid], dtype=np.float32)
        except KeyError:
            raise DataError(f"No features for sample {sid}.") from None
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise DataError(
                f"Features of sample {sid} must be a non-empty (n_tiles, dim) array, got {arr.shape}."
            )
        if self.dim is None:
            self.dim = arr.shape[1]
        elif arr.shape[1] != self.dim:
            raise DataError(f"Features of sample {sid} have {arr.shape[1]} dimensions, others {self.dim}.")
        if i not in self._checked:
            if not np.isfinite(arr).all():
                raise DataError(f"Features of sample {sid} contain NaN or infinite values.")
            self._checked.add(i)
        if self.keep:
            self._cache[i] = arr
        return arr

    def batch(self, idx: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, dim, N_max)`` features and ``(B, N_max)`` mask; padding is zeros, masked out."""
        x, mask = self.arrays(idx)
        return torch.from_numpy(x).to(device), torch.from_numpy(mask).to(device)

    def arrays(self, idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`batch` as host arrays (what :func:`~napari_he2rna.model.prefetch.iter_batches` reads)."""
        arrays = [self.get(int(i)) for i in idx]
        n_max = max(a.shape[0] for a in arrays)
        x = np.zeros((len(arrays), arrays[0].shape[1], n_max), dtype=np.float32)
        mask = np.zeros((len(arrays), n_max), dtype=bool)
        for j, a in enumerate(arrays):
            x[j, :, : a.shape[0]] = a.T
            mask[j, : a.shape[0]] = True
        return x, mask


def predict_slides(
    model: HE2RNA,
    slides: SlideBatches,
    idx: Sequence[int],
    ks: Sequence[int],
    device: torch.device,
    batch_size: int = 16,
    aggregation: str = "topk",
) -> np.ndarray:
    """Slide predictions ``(len(idx), n_genes)``: the mean over k in ``ks`` of the top-k mean of the tile
    scores (``aggregation="topk"``, HE2RNA), or the plain mean over the tiles (``"mean"``)."""
    model.eval()
    out = []
    batches = [idx[start : start + batch_size] for start in range(0, len(idx), batch_size)]
    with torch.no_grad(), closing(iter_batches(slides, batches, device)) as stream:
        for x, mask in stream:
            scores = model(x, mask)
            if aggregation == "mean":
                m = mask[:, None, :].to(scores.dtype)
                out.append(((scores * m).sum(2) / m.sum(2).clamp_min(1)).cpu().numpy())
            else:
                out.append(topk_mean_multi(scores, mask, ks).cpu().numpy())
    if not out:
        return np.zeros((0, model.n_genes), dtype=np.float32)
    return np.concatenate(out)


def bundle_oof_predictions(
    bundle: ModelBundle, cohort: Cohort, device: str = "auto"
) -> tuple[pd.DataFrame, np.ndarray]:
    """Out-of-fold predictions of a saved fold ensemble on its training cohort.

    Each sample is predicted by the fold model that did not see it (``metadata['folds']``); samples not in
    that map are predicted by the whole ensemble (and flagged with fold -1). The bundle's linear-baseline
    genes (:attr:`~napari_he2rna.model.bundle.ModelBundle.linear_genes`) come from its fold linear maps.

    Returns
    -------
    (pd.DataFrame, np.ndarray)
        Predictions ``(n_samples, n_genes)`` for ``bundle.genes`` and the fold per sample.
    """
    from ..cohorts.cohort import tile_mean

    fold_map = {str(k): int(v) for k, v in (bundle.metadata.get("folds") or {}).items()}
    ids = cohort.sample_ids
    folds = np.array([fold_map.get(s, -1) for s in ids], dtype=np.int64)
    modules, linear = bundle.fold_modules()
    if linear and bundle.linear_weight < 1.0:  # a blend (--model-type ensemble): one module per fold
        from .blend import Blend

        modules = [Blend(m, lin, bundle.linear_weight) for m, lin in zip(modules, linear, strict=True)]
        linear = None
    dev = resolve_device(device)
    first = np.asarray(cohort.features[ids[0]])
    if first.ndim != 2 or first.shape[1] != bundle.feature_dim:
        raise DataError(
            f"The cohort's features have {first.shape[-1]} dimensions but the model takes "
            f"{bundle.feature_dim} "
            f"({bundle.backbone}); extract features with the model's backbone."
        )
    # A linear model: the mean of its tile scores is its value at the mean tile (exact, and it uses every
    # tile even when the cohort holds supertiles).
    means = None
    if linear or (bundle.aggregation == "mean" and not bundle.hidden):
        means = {s: tile_mean(cohort.features, s)[None, :].astype(np.float32) for s in ids}
    if bundle.aggregation == "mean" and not bundle.hidden:
        slides = SlideBatches(means, ids, keep_in_memory=True)
    elif bundle.aggregation == "kmeans":
        # The slide input of SEQUOIA's re-trainings: the k-means cluster means of each slide's tile features.
        clusters = {s: bundle.slide_inputs(np.asarray(cohort.features[s])) for s in ids}
        slides = SlideBatches(clusters, ids, keep_in_memory=True)
    else:
        slides = SlideBatches(cohort.features, ids, keep_in_memory=False)
    preds = _oof(modules, slides, folds, bundle.ks, dev, bundle.aggregation)
    if linear:
        cols = bundle.gene_index(bundle.linear_genes)
        lin_slides = SlideBatches(means, ids, keep_in_memory=True)
        preds[:, cols] = _oof(linear, lin_slides, folds, bundle.ks, dev, "mean")
    folds[(folds < 0) | (folds >= len(modules))] = -1
    return pd.DataFrame(preds, index=pd.Index(ids, name="sample_id"), columns=bundle.genes), folds


def _oof(
    modules: Sequence[HE2RNA],
    slides: SlideBatches,
    folds: np.ndarray,
    ks: Sequence[int],
    dev: torch.device,
    agg: str,
) -> np.ndarray:
    """Each sample by the fold model that did not see it; those of no fold by the mean of them all."""
    preds = np.zeros((len(folds), modules[0].n_genes), dtype=np.float32)
    for f, m in enumerate(modules):
        idx = np.flatnonzero(folds == f)
        if len(idx):
            preds[idx] = predict_slides(m.to(dev), slides, idx, ks, dev, aggregation=agg)
    rest = np.flatnonzero((folds < 0) | (folds >= len(modules)))
    if len(rest):
        preds[rest] = np.mean(
            [predict_slides(m.to(dev), slides, rest, ks, dev, aggregation=agg) for m in modules], axis=0
        )
    return preds
