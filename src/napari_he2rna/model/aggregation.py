"""The feature k-means that makes a slide's input for SEQUOIA's HE2RNA re-trainings.

The HE2RNA models the SEQUOIA authors published (``gevaertlab/he2rna-{cancer}-{fold}``) never see single
tiles at the slide level: per slide, the tile features are clustered with scikit-learn's ``KMeans``
(100 clusters, ``random_state=0``) and the network sees the 100 cluster means, over which the top-k means are
taken (``pre_processing/kmean_features.py`` of their repository). This module computes those means, so that
the model (:class:`~napari_he2rna.model.bundle.ModelBundle`) and the feature side (caches, the viewer) make
the same slide input. Nothing here imports Qt or napari.

Choices, pinned so that a scikit-learn upgrade does not change a map:

* ``n_init=10``: their requirements pin scikit-learn 0.21.2, whose ``KMeans`` default is 10 k-means++ runs
  (the best kept); scikit-learn 1.4 and later default to ``n_init="auto"``, a single run for k-means++,
  which would give other clusters. ``max_iter=300`` and ``tol=1e-4`` are the defaults of both. The k-means++
  seeding draws its random numbers differently across scikit-learn versions, so the clusters are theirs in
  method, not bit for bit.
* A slide with fewer tiles than clusters: SEQUOIA's authors left such slides out; here each tile is its own
  cluster (its features are the input as they are) and a :class:`FewTilesWarning` says so.
* Clusters left empty (a slide with fewer distinct tiles than clusters) are dropped, with the same warning,
  where the authors' script would have produced NaN means.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import He2rnaWarning, ModelError

#: scikit-learn's KMeans iteration limit and tolerance (its defaults in 0.21 and now), pinned.
KMEANS_MAX_ITER = 300
KMEANS_TOL = 1e-4


class FewTilesWarning(He2rnaWarning):
    """A slide has fewer (distinct) tiles than the model's k-means has clusters."""


def kmeans_cluster_means(
    features: np.ndarray, n_clusters: int = 100, random_state: int = 0, n_init: int = 10
) -> np.ndarray:
    """Per-cluster mean features of one slide, SEQUOIA's slide input.

    Parameters
    ----------
    features
        ``(n_tiles, dim)`` tile features of one slide.
    n_clusters, random_state, n_init
        scikit-learn ``KMeans`` settings (SEQUOIA: 100, 0, and 10 = the default of the scikit-learn they
        used; see the module's notes).

    Returns
    -------
    np.ndarray
        ``(n_clusters, dim)`` float32 cluster means in the order of the cluster labels; the tiles themselves
        when the slide has no more tiles than clusters, and fewer rows when clusters came out empty (both
        with a :class:`FewTilesWarning`).
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ModelError(f"Tile features must be an (n_tiles, dim) array, got shape {x.shape}.")
    k = int(n_clusters)
    if k < 1:
        raise ModelError(f"The k-means needs at least 1 cluster, not {n_clusters}.")
    if x.shape[0] <= k:
        if x.shape[0] < k:
            warnings.warn(
                f"the slide has {x.shape[0]} tiles, fewer than the {k} k-means clusters of the model: each "
                "tile is its own cluster (SEQUOIA's authors left such slides out).",
                FewTilesWarning,
                stacklevel=2,
            )
        return x.copy()

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    km = KMeans(
        n_clusters=k,
        random_state=int(random_state),
        n_init=int(n_init),
        max_iter=KMEANS_MAX_ITER,
        tol=KMEANS_TOL,
    )
    with warnings.catch_warnings():
        # "fewer distinct clusters than n_clusters": said below, once, in this package's words.
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = km.fit(x).labels_
    means = [x[labels == c].mean(axis=0) for c in range(k) if np.any(labels == c)]
    if len(means) < k:
        warnings.warn(
            f"the slide's tiles form only {len(means)} distinct k-means clusters of the model's {k}: the "
            "slide-level prediction uses those.",
            FewTilesWarning,
            stacklevel=2,
        )
    return np.stack(means).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Clustering:
    """How a bundle with ``aggregation == "kmeans"`` turns a slide's tile features into its input."""

    n_clusters: int = 100
    random_state: int = 0
    n_init: int = 10

    def __post_init__(self) -> None:
        if int(self.n_clusters) < 1 or int(self.n_init) < 1:
            raise ModelError(
                f"A k-means needs at least 1 cluster and 1 run (got {self.n_clusters} and {self.n_init})."
            )

    def cluster_means(self, features: np.ndarray) -> np.ndarray:
        """:func:`kmeans_cluster_means` with these settings."""
        return kmeans_cluster_means(features, self.n_clusters, self.random_state, self.n_init)

    def to_json(self) -> dict[str, int]:
        return {
            "n_clusters": int(self.n_clusters),
            "random_state": int(self.random_state),
            "n_init": int(self.n_init),
        }

    @classmethod
    def from_json(cls, doc: Any) -> Clustering:
        """From :meth:`to_json`'s dict; :class:`ModelError` when it is not one."""
        if not isinstance(doc, dict):
            raise ModelError(f"k-means settings must be a JSON object, not {type(doc).__name__}.")
        try:
            return cls(int(doc["n_clusters"]), int(doc["random_state"]), int(doc["n_init"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"incomplete k-means settings ({exc!s}).") from None


@dataclass(frozen=True)
class Supertiles:
    """How a model trained on supertiles (``he2rna train --supertiles``) makes a slide's input: the slide's
    supertiles, k-means of the tile *positions* into ``k`` clusters and the mean feature of each, exactly as
    the training cohort's were made (:func:`napari_he2rna.features.extraction.supertile_means`). Its top-k
    aggregation then sees what it was trained on (``k`` rows per slide), not thousands of tiles: with the k
    list 50 100, the top half of a slide's supertiles, where a slide of 8,000 tiles would give its top 1 %."""

    k: int = 100
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"kind": "supertiles", "k": int(self.k), "seed": int(self.seed)}

    @classmethod
    def from_json(cls, doc: Any) -> Supertiles:
        if not isinstance(doc, dict) or doc.get("kind") != "supertiles":
            raise ModelError("malformed supertile settings")
        k, seed = int(doc["k"]), int(doc["seed"])
        if k < 1:
            raise ModelError(f"a slide needs at least 1 supertile, not {k}")
        return cls(k, seed)

    def means(self, positions: np.ndarray | None, features: np.ndarray) -> np.ndarray:
        """The slide's ``(min(k, N), dim)`` supertile features; ``positions`` ``(N, 2)`` tile centres in
        level-0 px (not needed when the slide has at most ``k`` tiles: then they are the tiles)."""
        from ..features.extraction import supertile_means

        features = np.asarray(features, dtype=np.float32)
        if len(features) <= self.k:
            return features
        if positions is None or len(positions) != len(features):
            raise ModelError(
                f"This model predicts a slide from its {self.k} supertiles (k-means of the tile positions, "
                "as it was trained): give the tiles' positions with their features."
            )
        return supertile_means(positions, features, self.k, self.seed)[0]
