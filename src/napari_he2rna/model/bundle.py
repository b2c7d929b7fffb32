"""The one-file model bundle: writing, reading and checking it, and a loaded ensemble's inference.

A model is shipped as ONE ``.safetensors`` file: the weights of every cross-validation fold (keys prefixed
``fold{i}.``) and a JSON document in the safetensors header (genes, backbone, feature size, tile size, hidden
sizes, k lists, training summary, validation R, a checksum). Loading never unpickles anything. The network
itself is :mod:`napari_he2rna.model.network`; converters of published checkpoints are
:mod:`napari_he2rna.model.convert`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import GeneError, ModelError
from .aggregation import Clustering, Supertiles
from .bundle_header import read_header
from .mixed import (
    checked_linear_genes,
    combine,
    describe_linear,
    is_blend,
    linear_columns,
    linear_shapes,
    linear_tensors,
    mixed_scores,
    model_of_genes,
    read_linear_genes,
    read_linear_weight,
    stored_linear_layers,
    widen,
)
from .network import HE2RNA, topk_mean_multi

FORMAT_NAME = "napari-he2rna-model"
FORMAT_VERSION = 1

#: How a slide's prediction is made from its tile scores: HE2RNA's top-k means, the mean of every tile (the
#: linear baseline), or HE2RNA's top-k means over the means of k-means clusters of the tile features
#: (SEQUOIA's re-trainings, :mod:`napari_he2rna.model.aggregation`).
AGGREGATIONS = ("topk", "mean", "kmeans")


def _tensor_digest(tensors: Mapping[str, torch.Tensor], metadata_json: str) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes, in key order) and the metadata document."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    h.update(metadata_json.encode())
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename (never half a file).

    The file gets the user's umask mode (:func:`napari_he2rna.safe_output.atomic_write_bytes`).
    """
    from ..safe_output import atomic_write_bytes as write_bytes
    from ..safe_output import prepare_folder

    prepare_folder(Path(path).parent, "model's folder")
    write_bytes(path, data)


def json_default(obj: Any):
    """JSON encoder for numpy scalars and arrays and paths (``json.dumps(default=json_default)``)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_bundle(
    path: str | Path,
    models: Sequence[HE2RNA],
    genes: Sequence[str],
    backbone: str,
    feature_dim: int,
    tile_um: float,
    ks: Sequence[int],
    metadata: Mapping[str, Any] | None = None,
    demo: bool = False,
    aggregation: str = "topk",
    *,
    tile_px: int | None = None,
    tile_magnification: float | None = None,
    input_resize: bool = True,
    clustering: Clustering | None = None,
    linear_models: Sequence[HE2RNA] | None = None,
    linear_genes: Sequence[str] | None = None,
    linear_weight: float = 1.0,
    supertiles: Supertiles | None = None,
) -> Path:
    """Write a fold ensemble as one ``.safetensors`` model bundle (atomically).

    Parameters
    ----------
    path
        Output file (``.safetensors``).
    models
        One :class:`HE2RNA` per cross-validation fold, same architecture; averaged at inference.
    genes
        Output names, in the order of the model outputs.
    backbone, feature_dim, tile_um
        The features the model expects: backbone name, features per tile, tile side in µm.
    ks
        The k list ``L`` used at inference.
    metadata
        Free-form JSON-serialisable extras, e.g. ``cohort`` (training cohort summary), ``validation_r``
        (``{cancer_type: {gene: R}}``), ``folds`` (``{sample_id: fold}``), ``training`` (config).
    demo
        True for a model trained on synthetic slides (the UI then says it means nothing on real tissue).
    aggregation
        How tile scores make a slide's prediction: ``"topk"`` (HE2RNA: mean over k in ``ks`` of the top-k
        mean), ``"mean"`` (every tile; the linear baseline) or ``"kmeans"`` (HE2RNA's top-k means over the
        means of the k-means clusters of the tile features, ``clustering``; SEQUOIA's re-trainings).
    tile_px, tile_magnification
        The tile size as the model was trained on it, in pixels at a magnification (e.g. 256 px at 20x),
        beside ``tile_um``; both or neither.
    input_resize
        False when the backbone was fed each tile at its own pixel size (``tile_px``), not resized to its
        usual input side.
    clustering
        The k-means of ``aggregation="kmeans"`` (default :class:`~napari_he2rna.model.aggregation.Clustering`:
        100 clusters, ``random_state=0``, ``n_init=10``).
    linear_models, linear_genes
        Genes from the linear baseline (:mod:`napari_he2rna.model.mixed`, ``--model-type ensemble``): one
        linear module per fold (``HE2RNA(d, len(genes), hidden=())`` on raw features, as
        :func:`~napari_he2rna.model.baseline.linear_module` makes) and the names whose tile scores and slide
        predictions (the mean of the tile scores) come from it; only their rows are stored. None or empty:
        a plain HE2RNA bundle, the same bytes as without them.
    supertiles
        A model trained on supertiles: a slide's prediction aggregates its supertiles (made from the tile
        positions as in training), not its tiles (:class:`~napari_he2rna.model.aggregation.Supertiles`).
    linear_weight
        1: each linear gene from the linear map alone. Below 1 (``--model-type ensemble``,
        :mod:`napari_he2rna.model.blend`): every gene (``linear_genes`` = all genes) scores a tile with
        ``(1 - w) HE2RNA + w linear`` and is aggregated as HE2RNA's.

    Returns
    -------
    Path
        The written file.
    """
    from safetensors.torch import save

    path = Path(path)
    models = list(models)
    genes = [str(g) for g in genes]
    if not models:
        raise ModelError("Cannot save a model bundle without any model.")
    if len(set(genes)) != len(genes):
        raise ModelError("The gene list of a model bundle has duplicate names.")
    first = models[0]
    for m in models:
        if (m.input_dim, m.n_genes, m.hidden) != (first.input_dim, first.n_genes, first.hidden):
            raise ModelError("All fold models of a bundle must have the same architecture.")
    if first.n_genes != len(genes):
        raise ModelError(
            f"The models predict {first.n_genes} outputs but {len(genes)} gene names were given."
        )
    if aggregation not in AGGREGATIONS:
        raise ModelError(f"Unknown aggregation {aggregation!r} (use {' or '.join(AGGREGATIONS)}).")
    if first.input_dim != int(feature_dim):
        raise ModelError(f"The models take {first.input_dim} features per tile, not {feature_dim}.")
    if (tile_px is None) != (tile_magnification is None):
        raise ModelError("A tile size in pixels needs its magnification, and a magnification its pixels.")
    if tile_px is not None and (int(tile_px) < 1 or not float(tile_magnification) > 0):
        raise ModelError(f"A tile of {tile_px} px at {tile_magnification}x is not a tile size.")
    if clustering is not None and aggregation != "kmeans":
        raise ModelError(f"k-means settings belong to the 'kmeans' aggregation, not {aggregation!r}.")
    linear_genes = checked_linear_genes(
        genes, len(models), int(feature_dim), aggregation, linear_models, linear_genes, linear_weight
    )

    tensors: dict[str, torch.Tensor] = {}
    for i, m in enumerate(models):
        for key, value in m.state_dict().items():
            tensors[f"fold{i}.{key}"] = value.detach().to("cpu", torch.float32).contiguous().clone()
    if linear_genes:
        tensors.update(linear_tensors(linear_models, genes, linear_genes))
    bad = next((key for key, t in tensors.items() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise ModelError(
            f"The model has non-finite weights ({bad}): training diverged or its targets or features hold "
            "non-finite values; nothing was written."
        )

    doc = {
        "genes": genes,
        "backbone": str(backbone),
        "feature_dim": int(feature_dim),
        "tile_um": float(tile_um),
        "hidden": list(first.hidden),
        "dropout": first.dropout_p,
        "ks": [int(k) for k in ks],
        "n_folds": len(models),
        "demo": bool(demo),
        "aggregation": aggregation,
        "extra": dict(metadata or {}),
    }
    # Written only where they differ from what bundles without them mean (older readers ignore them).
    if tile_px is not None:
        doc["tile_px"], doc["tile_magnification"] = int(tile_px), float(tile_magnification)
    if not input_resize:
        doc["input_resize"] = False
    if aggregation == "kmeans":
        doc["clustering"] = (clustering or Clustering()).to_json()
    if supertiles is not None:
        if aggregation != "topk":
            raise ModelError(f"Supertile slide inputs go with the top-k aggregation, not {aggregation!r}.")
        doc["slide_input"] = supertiles.to_json()
    if linear_genes:
        doc["linear_genes"] = linear_genes
        if float(linear_weight) < 1.0:
            doc["linear_weight"] = float(linear_weight)
    doc_json = json.dumps(doc, default=json_default, sort_keys=True, allow_nan=True)
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "he2rna": doc_json,
        "sha256": _tensor_digest(tensors, doc_json),
    }
    atomic_write_bytes(path, save(tensors, metadata=header))
    return path


def _layer_shapes(input_dim: int, hidden: Sequence[int], n_genes: int) -> dict[str, tuple[int, ...]]:
    sizes = [input_dim, *hidden, n_genes]
    shapes = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        shapes[f"layers.{i}.weight"] = (b, a, 1)
        shapes[f"layers.{i}.bias"] = (b,)
    return shapes


@dataclass
class ModelBundle:
    """A loaded fold ensemble and what it expects.

    ``layers[f]`` holds the (weight ``(out, in)``, bias ``(out,)``) float32 pairs of fold ``f``. What a map
    depends on beside the features: ``tile_um`` (always), ``tile_px`` at ``tile_magnification`` (the size the
    model was trained on, where known), ``input_resize`` (False: the backbone saw each tile at its own pixel
    size) and, for ``aggregation == "kmeans"``, the ``clustering`` that makes a slide's input.

    ``linear_genes`` come from the linear baseline (:mod:`napari_he2rna.model.mixed`): ``linear_layers[f]``
    is fold ``f``'s ``(weight (L, d), bias (L,))`` for them, and ``layers`` is given as the HE2RNA layers and
    kept with each fold's last layer widened to read the extra columns that :meth:`hidden_activations` adds.
    """

    genes: list[str]
    backbone: str
    feature_dim: int
    tile_um: float
    ks: tuple[int, ...]
    hidden: tuple[int, ...]
    dropout: float
    demo: bool
    metadata: dict
    layers: list[list[tuple[torch.Tensor, torch.Tensor]]]
    path: Path | None = None
    aggregation: str = "topk"
    tile_px: int | None = None
    tile_magnification: float | None = None
    input_resize: bool = True
    clustering: Clustering | None = None
    linear_genes: list[str] = field(default_factory=list)
    linear_layers: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)
    linear_weight: float = 1.0  # below 1: every gene blends HE2RNA and the linear map (model/blend.py)
    supertiles: Supertiles | None = None  # trained on supertiles: a slide is predicted from its supertiles
    _gene_index: dict[str, int] = field(default_factory=dict, repr=False)
    _hidden_cache: tuple | None = field(default=None, repr=False)
    _slide_input_cache: tuple | None = field(default=None, repr=False)
    _he2rna_last: list | None = field(default=None, repr=False)  # each fold's last layer as trained
    _input_maps: list | None = field(default=None, repr=False)  # combine's, per fold
    _is_linear: torch.Tensor | None = field(default=None, repr=False)  # (G,) bool

    def __post_init__(self) -> None:
        self._gene_index = {g: i for i, g in enumerate(self.genes)}
        if self.aggregation == "kmeans" and self.clustering is None:
            self.clustering = Clustering()
        chosen = set(self.linear_genes or [])
        self.linear_genes = [g for g in self.genes if g in chosen]
        if self.linear_genes:
            if self.linear_layers is None or len(self.linear_layers) != self.n_folds:
                raise ModelError("A bundle with linear-baseline genes needs one linear map per fold.")
            rows = self.gene_index(self.linear_genes)
            self._is_linear = torch.zeros(len(self.genes), dtype=torch.bool)
            self._is_linear[rows] = True
            self._he2rna_last = [fold[-1] for fold in self.layers]
            self.layers, self._input_maps = combine(
                self.layers, self.linear_layers, rows, self.feature_dim, self.linear_weight
            )

    @property
    def _mlp_width(self) -> int:
        """Width of the HE2RNA part of a fold's hidden activations (its last hidden layer)."""
        return self.hidden[-1] if self.hidden else self.feature_dim

    # -- description ----------------------------------------------------------------------------------
    @property
    def n_folds(self) -> int:
        return len(self.layers)

    def gene_index(self, genes: Sequence[str] | str | None = None) -> list[int]:
        """Output rows of ``genes`` (all genes when None); unknown names raise :class:`GeneError`."""
        if genes is None:
            return list(range(len(self.genes)))
        if isinstance(genes, str):
            genes = [genes]
        missing = [g for g in genes if g not in self._gene_index]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise GeneError(f"The model does not predict {shown} (it knows {len(self.genes)} genes).")
        return [self._gene_index[g] for g in genes]

    def model_of(self, gene: str) -> str:
        """``"HE2RNA"`` or ``"linear baseline"``: which model makes ``gene``'s tile scores and prediction."""
        return model_of_genes(self, gene)

    def check_features(self, backbone: str, dim: int, tile_um: float | None = None) -> None:
        """Raise :class:`ModelError` unless (backbone, dim, tile µm) are what the model expects."""
        if backbone != self.backbone:
            raise ModelError(
                f"The model expects features of backbone '{self.backbone}', not '{backbone}'; "
                "extract features with that backbone."
            )
        if int(dim) != self.feature_dim:
            raise ModelError(f"The model expects {self.feature_dim} features per tile, got {dim}.")
        if tile_um is not None and abs(float(tile_um) - self.tile_um) > 1e-6 * max(1.0, self.tile_um):
            raise ModelError(f"The model expects tiles of {self.tile_um:g} µm, got {float(tile_um):g} µm.")

    def describe(self) -> str:
        """One paragraph for the UI / CLI."""
        meta = self.metadata
        cohort = meta.get("cohort") or {}
        parts = [
            f"{'HE2RNA + linear baseline' if is_blend(self) else 'HE2RNA'} model: {len(self.genes)} genes, "
            f"ensemble of {self.n_folds} fold(s), "
            f"hidden layers {list(self.hidden)}, backbone '{self.backbone}' ({self.feature_dim} features), "
            f"{self._tiles_text()}, k in {list(self.ks)}."
        ]
        if self.aggregation == "kmeans" and self.clustering is not None:
            c = self.clustering
            parts.append(
                f"Slide input: the means of {c.n_clusters} k-means clusters of the tile features per slide "
                f"(scikit-learn, random_state {c.random_state}, n_init {c.n_init}); tile maps from every "
                "tile."
            )
        parts.append(describe_linear(self.genes, self.linear_genes, self.linear_weight, meta.get("training")))
        unit = meta.get("output_unit")
        if isinstance(unit, str) and unit.strip():
            parts.append(f"Outputs in {unit.strip()}.")
        if cohort:
            n = cohort.get("n_samples")
            types = cohort.get("cancer_types")
            txt = "Trained on"
            txt += f" {n} samples" if n is not None else " a cohort"
            if types:
                txt += f" of {len(types)} cancer type(s) ({', '.join(map(str, list(types)[:6]))})"
            parts.append(txt + ".")
        vr = meta.get("validation_r") or {}
        if vr:
            vals = [v for per in vr.values() for v in per.values() if v is not None and np.isfinite(v)]
            if vals:
                parts.append(f"Median cross-validated R per gene and cancer type: {np.median(vals):.2f}.")
        if self.demo:
            parts.append(
                "DEMO MODEL: trained on synthetic sample slides; its predictions mean nothing on real tissue."
            )
        return " ".join(p for p in parts if p)

    def _tiles_text(self) -> str:
        if self.tile_px is None:
            return f"tiles of {self.tile_um:g} µm"
        text = f"tiles of {self.tile_px} px at {self.tile_magnification:g}x (about {self.tile_um:g} µm)"
        return text + (", not resized" if not self.input_resize else "")

    # -- inference ------------------------------------------------------------------------------------
    def _as_tensor(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ModelError(
                f"Features must be an (n_tiles, {self.feature_dim}) array, got shape {tuple(x.shape)}."
            )
        return x

    def hidden_activations(
        self, features: np.ndarray | torch.Tensor, chunk: int = 4096
    ) -> list[torch.Tensor]:
        """Last hidden activations ``(N, h)`` per fold, not cached (callers that keep them, like the viewer's
        :class:`~napari_he2rna.maps.session.SlideSession`, own their cache). With linear genes
        ``(N, h + w)``: the columns their scores are made from follow (:func:`~.mixed.widen`)."""
        x = self._as_tensor(features)
        outs = []
        maps = self._input_maps or [None] * self.n_folds
        with torch.no_grad():
            for fold, input_map in zip(self.layers, maps, strict=True):
                parts = []
                for start in range(0, x.shape[0], chunk):
                    h = x[start : start + chunk]
                    for w, b in fold[:-1]:
                        h = torch.relu(torch.addmm(b, h, w.T))
                    if self.linear_genes:
                        h = widen(h, x[start : start + chunk], input_map)
                    parts.append(h)
                outs.append(torch.cat(parts) if parts else x.new_zeros((0, fold[-1][0].shape[1])))
        return outs

    def scores_from_hidden(
        self, hidden: Sequence[torch.Tensor], genes: Sequence[str] | str | None = None
    ) -> list[torch.Tensor]:
        """Per-fold tile scores ``(N, len(genes))`` from :meth:`hidden_activations` (one small product)."""
        sel = torch.as_tensor(self.gene_index(genes), dtype=torch.long)
        scores = []
        with torch.no_grad():
            for fold, h in zip(self.layers, hidden, strict=False):
                if self._is_linear is not None and not is_blend(self):
                    scores.append(mixed_scores(h, fold[-1], sel, self._is_linear, self._mlp_width))
                    continue
                w, b = fold[-1]
                # Only the requested output rows: one gene for 8,000 tiles is one (N, h) x (h,) product.
                scores.append(torch.addmm(b[sel], h, w[sel].T))  # (N, len(genes))
        return scores

    def _hidden(self, x: torch.Tensor, chunk: int) -> list[torch.Tensor]:
        """:meth:`hidden_activations`, cached for the last feature matrix seen.

        The hidden layers do not depend on the gene; caching them makes picking genes one after the other
        cost one small matrix product each.
        """
        key = _features_key(x)
        if self._hidden_cache is not None and self._hidden_cache[0] == key:
            return self._hidden_cache[1]
        outs = self.hidden_activations(x, chunk)
        self._hidden_cache = (key, outs)
        return outs

    def _fold_scores(self, features, genes) -> tuple[list[torch.Tensor], list[int]]:
        idx = self.gene_index(genes)
        hidden = self._hidden(self._as_tensor(features), chunk=4096)
        return self.scores_from_hidden(hidden, genes), idx

    def tile_scores(self, features: np.ndarray, genes: Sequence[str] | str | None = None) -> np.ndarray:
        """Per-tile predicted expression (the bundle's output unit, ``log10(1 + FPKM-UQ)`` for gene
        models), averaged over the folds.

        Parameters
        ----------
        features
            ``(N, feature_dim)`` features of the slide's tiles.
        genes
            Gene names (default: all genes of the model).

        Returns
        -------
        np.ndarray
            ``(N, len(genes))`` float32.
        """
        scores, _ = self._fold_scores(features, genes)
        return torch.stack(scores).mean(dim=0).numpy()

    @property
    def uses_slide_inputs(self) -> bool:
        """A slide's prediction aggregates :meth:`slide_inputs` (k-means means, supertiles), not its tiles."""
        return self.aggregation == "kmeans" or self.supertiles is not None

    def slide_prediction(
        self,
        features: np.ndarray,
        genes: Sequence[str] | str | None = None,
        positions: np.ndarray | None = None,
    ) -> np.ndarray:
        """Slide-level prediction ``(len(genes),)``: per fold, the mean over k in ``ks`` of the top-k mean of
        the tile scores (``aggregation == "topk"``) or the mean of all tile scores (``"mean"``, the linear
        baseline), then averaged over folds (each fold model was trained with its own aggregation). A gene of
        :attr:`linear_genes` is the mean of its tile scores whatever the aggregation (not in a blend,
        ``linear_weight < 1``, aggregated as HE2RNA's).

        With :attr:`uses_slide_inputs` the scores are those of :meth:`slide_inputs` (k-means cluster means:
        SEQUOIA's forward pass, ReLU between layers, nothing after the last; or the slide's supertiles)."""
        if self.uses_slide_inputs:
            hidden = self.hidden_activations(self.slide_inputs(features, positions))
            return self.aggregate_fold_scores(self.scores_from_hidden(hidden, genes), genes)
        scores, _ = self._fold_scores(features, genes)
        return self.aggregate_fold_scores(scores, genes)

    def slide_inputs(
        self, features: np.ndarray | torch.Tensor, positions: np.ndarray | None = None
    ) -> np.ndarray:
        """What the slide-level prediction aggregates over, ``(n, feature_dim)`` float32: the tile features
        themselves, with ``aggregation == "kmeans"`` the means of their k-means clusters (``clustering``), or
        for a model trained on supertiles the slide's supertiles (``positions``: the tile centres, ``(N, 2)``
        level-0 px); computed once for the last feature matrix seen."""
        x = self._as_tensor(features)
        if self.supertiles is None and (self.aggregation != "kmeans" or self.clustering is None):
            return x.numpy()
        how = self.supertiles if self.supertiles is not None else self.clustering
        key = (_features_key(x), how)
        if self._slide_input_cache is not None and self._slide_input_cache[0] == key:
            return self._slide_input_cache[1]
        if self.supertiles is not None:
            means = self.supertiles.means(positions, x.numpy())
        else:
            means = self.clustering.cluster_means(x.numpy())
        self._slide_input_cache = (key, means)
        return means

    def aggregate_fold_scores(
        self, scores: Sequence[torch.Tensor], genes: Sequence[str] | str | None = None
    ) -> np.ndarray:
        """Slide-level prediction from per-fold scores ``(N, len(genes))`` of ``genes`` (None: all genes; see
        :meth:`slide_prediction`): of the tiles, or with ``aggregation == "kmeans"`` of the rows of
        :meth:`slide_inputs` (the cluster means). The columns of :attr:`linear_genes` are their mean (in a
        blend, ``linear_weight < 1``, as every other)."""
        linear = None
        if self._is_linear is not None and len(scores) and not is_blend(self):
            linear = linear_columns(self, genes, scores[0].shape[1])
        preds = []
        for s in scores:
            if self.aggregation == "mean":
                preds.append(s.mean(dim=0))
                continue
            top = topk_mean_multi(s.T[None], None, self.ks)[0]
            preds.append(top if linear is None else torch.where(linear, s.mean(dim=0), top))
        return torch.stack(preds).mean(dim=0).numpy()

    def fold_modules(self) -> tuple[list[HE2RNA], list[HE2RNA] | None]:
        """The fold models as modules: HE2RNA's (every gene's output, as trained) and, with
        :attr:`linear_genes`, the linear maps (``HE2RNA(d, L, hidden=())``, outputs ``linear_genes``)."""
        out = []
        for f, fold in enumerate(self.layers):
            m = HE2RNA(self.feature_dim, len(self.genes), self.hidden, self.dropout)
            trained = [*fold[:-1], self._he2rna_last[f]] if self._he2rna_last else fold
            with torch.no_grad():
                for layer, (w, b) in zip(m.layers, trained, strict=True):
                    layer.weight.copy_(w[:, :, None])
                    layer.bias.copy_(b)
            out.append(m)
        if not self.linear_genes:
            return out, None
        linear = []
        for w, b in self.linear_layers:
            m = HE2RNA(self.feature_dim, len(self.linear_genes), hidden=(), dropout=0.0)
            with torch.no_grad():
                m.layers[0].weight.copy_(w[:, :, None])
                m.layers[0].bias.copy_(b)
            linear.append(m.eval())
        return out, linear

    def to_modules(self) -> list[HE2RNA]:
        """The fold models as :class:`HE2RNA` modules (to fine-tune them); refused with linear genes."""
        if self.linear_genes:
            raise ModelError(
                f"This model takes {len(self.linear_genes)} genes from the linear baseline and cannot be "
                "fine-tuned as one network: fine-tune the HE2RNA part: retrain with --model-type he2rna."
            )
        return self.fold_modules()[0]


def _features_key(x: torch.Tensor) -> tuple:
    """Identity of a feature matrix for the caches of :class:`ModelBundle` (shape and a digest)."""
    return (tuple(x.shape), hashlib.blake2b(x.numpy().tobytes(), digest_size=16).hexdigest())


def load_bundle(path: str | Path) -> ModelBundle:
    """Load a ``.safetensors`` model bundle written by :func:`save_bundle`.

    Nothing is unpickled. A file that is not a bundle, was truncated, edited or does not fit its own
    description raises :class:`ModelError` with one sentence saying what is wrong. ``.pt``/``.pth``
    checkpoints must first go through :func:`convert_checkpoint`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    name = path.name
    if path.suffix.lower() in {".pt", ".pth", ".ckpt", ".bin"}:
        raise ModelError(
            f"{name} is a PyTorch checkpoint; convert it to a model bundle first with convert_checkpoint "
            "(checkpoints are never unpickled at load time)."
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"Model file {path} does not exist.") from None
    except OSError as exc:
        raise ModelError(f"Model file {path} cannot be read ({exc.strerror}).") from None

    header = read_header(data, name)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelError(f"{name} is a safetensors file but not a napari-he2rna model bundle.")
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise ModelError(
            f"{name} has model format version {meta.get('format_version')!r}; this version reads 1."
        )
    try:
        doc = json.loads(meta["he2rna"])
        genes = [str(g) for g in doc["genes"]]
        backbone = str(doc["backbone"])
        feature_dim = int(doc["feature_dim"])
        tile_um = float(doc["tile_um"])
        hidden = tuple(int(h) for h in doc["hidden"])
        dropout = float(doc["dropout"])
        ks = tuple(int(k) for k in doc["ks"])
        n_folds = int(doc["n_folds"])
        demo = bool(doc["demo"])
        aggregation = str(doc.get("aggregation", "topk"))  # bundles written before it existed: HE2RNA
        extra = dict(doc.get("extra") or {})
        # Bundles written before these existed: tile size in µm only, tiles resized, no k-means.
        tile_px = None if doc.get("tile_px") is None else int(doc["tile_px"])
        tile_mag = None if doc.get("tile_magnification") is None else float(doc["tile_magnification"])
        input_resize = bool(doc.get("input_resize", True))
        clustering = Clustering.from_json(doc["clustering"]) if "clustering" in doc else None
        supertiles = Supertiles.from_json(doc["slide_input"]) if "slide_input" in doc else None
    except (KeyError, TypeError, ValueError, json.JSONDecodeError, ModelError) as exc:
        raise ModelError(f"{name} has incomplete or malformed model metadata ({exc!s}).") from None
    if aggregation not in AGGREGATIONS:
        raise ModelError(f"{name} has an unknown aggregation {aggregation!r}.")
    if not genes or n_folds < 1 or not ks or feature_dim < 1:
        raise ModelError(f"{name} has incomplete model metadata (no genes, folds, k list or feature size).")
    linear_genes = read_linear_genes(doc, genes, aggregation, name)
    linear_weight = read_linear_weight(doc, len(linear_genes), len(genes), name)

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{name} is corrupt: its weights cannot be read ({exc}).") from None

    expected = {
        f"fold{f}.{k}": s
        for f in range(n_folds)
        for k, s in _layer_shapes(feature_dim, hidden, len(genes)).items()
    }
    expected.update(linear_shapes(n_folds, len(linear_genes), feature_dim))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelError(f"{name} does not match its own description: weights {what}.")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ModelError(
                f"{name} does not match its own description: {key} has shape {tuple(tensors[key].shape)}, "
                f"expected {shape}."
            )
    if header.get("__metadata__", {}).get("sha256") != _tensor_digest(tensors, meta["he2rna"]):
        raise ModelError(
            f"{name} failed its checksum: the file was modified or corrupted after it was written."
        )
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ModelError(f"{name} contains non-finite weights in {key}.")

    layers = []
    for f in range(n_folds):
        fold = []
        for i in range(len(hidden) + 1):
            w = tensors[f"fold{f}.layers.{i}.weight"].to(torch.float32)[:, :, 0].contiguous()
            b = tensors[f"fold{f}.layers.{i}.bias"].to(torch.float32).contiguous()
            fold.append((w, b))
        layers.append(fold)
    return ModelBundle(
        genes=genes,
        backbone=backbone,
        feature_dim=feature_dim,
        tile_um=tile_um,
        ks=ks,
        hidden=hidden,
        dropout=dropout,
        demo=demo,
        metadata=extra,
        layers=layers,
        path=path,
        aggregation=aggregation,
        tile_px=tile_px,
        tile_magnification=tile_mag,
        input_resize=input_resize,
        clustering=clustering,
        supertiles=supertiles,
        linear_genes=linear_genes,
        linear_weight=linear_weight,
        linear_layers=stored_linear_layers(tensors, n_folds) if linear_genes else None,
    )
