"""Bundles whose genes come from two models: HE2RNA's fold MLPs and, for some genes, the linear baseline.

``he2rna train`` (its default ``--model-type ensemble``, :mod:`.blend`) trains HE2RNA and the ridge baseline
(:mod:`.baseline`) on the same folds and averages them tile by tile: ``linear_weight`` 0.5 and every gene a
linear gene (each gene's row below is then ``[0.5 W_h, 0.5 R]`` and it is aggregated as HE2RNA's). With
``linear_weight`` 1, a subset of genes can instead come from the linear map alone (their slide prediction the
mean of their tile scores), the rest from HE2RNA. Such a bundle holds beside the fold MLPs one linear map
per fold, ``linear{f}.weight`` ``(L, d)`` and ``linear{f}.bias`` ``(L,)``, for its ``L`` linear genes only
(the header's ``linear_genes``, in the bundle's gene order). A linear gene's tile score is the fold's linear
map of the tile's features, its slide prediction the mean of its tile scores (not the top-k mean), both
averaged over the folds as for every gene.

At inference each fold's "hidden" activations are widened with ``w`` columns computed from the raw tile
features, and its last layer with ``w`` input columns: an HE2RNA gene's row is ``[W_h, 0]``, a linear
gene's ``[0, R]``. With ``L <= d`` the extra columns are the linear genes' tile scores themselves (``R``
picks one; ``w = L``), else the features (``R`` is the linear map; ``w = d``): whichever is narrower. So the
cached hidden layers of the viewer (:class:`napari_he2rna.maps.session.SlideSession`) and its progressive
buffers hold every gene's input unchanged, and a gene still costs one small product per fold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import ModelError

if TYPE_CHECKING:
    from .bundle import ModelBundle
    from .network import HE2RNA

#: How a map's model is named (``ModelBundle.model_of``, the sidecar's ``map_models``, the colour bar).
HE2RNA_NAME = "HE2RNA"
LINEAR_NAME = "linear baseline"
BOTH_NAME = f"{HE2RNA_NAME} + {LINEAR_NAME}"
#: A blend (:mod:`.blend`, ``--model-type ensemble``): every gene from both models, averaged.
BLEND_NAME = f"{HE2RNA_NAME} and {LINEAR_NAME}, averaged"
#: How many linear genes ``describe`` names.
LISTED = 8

Layer = tuple[torch.Tensor, torch.Tensor]


def linear_key(fold: int, what: str) -> str:
    """The tensor name of fold ``fold``'s linear map (``what``: ``"weight"`` or ``"bias"``)."""
    return f"linear{fold}.{what}"


def checked_linear_genes(
    genes: Sequence[str],
    n_folds: int,
    feature_dim: int,
    aggregation: str,
    linear_models: Sequence[HE2RNA] | None,
    linear_genes: Sequence[str] | None,
    linear_weight: float = 1.0,
) -> list[str]:
    """The linear genes of a bundle to save, in the bundle's gene order ([] for a plain HE2RNA bundle).

    Raises :class:`ModelError` (one sentence) for linear genes with an aggregation other than top-k, unknown
    or repeated names, no linear models, linear models that do not fit (fold count, features, outputs), or a
    ``linear_weight`` outside (0, 1] (a weight below 1 blends every gene: all genes must be linear genes).
    """
    if not linear_genes:
        return []
    check_weight(linear_weight, len(linear_genes), len(genes), "The bundle to save")
    wanted = [str(g) for g in linear_genes]
    if aggregation != "topk":
        raise ModelError(
            f"Linear-baseline genes go with HE2RNA's top-k aggregation, not {aggregation!r}: save the linear "
            "baseline as its own bundle instead."
        )
    unknown = [g for g in wanted if g not in set(genes)]
    if unknown:
        raise ModelError(f"The linear-baseline genes {unknown[:5]} are not among the bundle's genes.")
    if len(set(wanted)) != len(wanted):
        raise ModelError("The linear-baseline gene list has duplicate names.")
    models = list(linear_models or [])
    if len(models) != n_folds:
        raise ModelError(
            f"Linear-baseline genes need one linear model per fold: {len(models)} for {n_folds} fold(s)."
        )
    for m in models:
        if m.hidden or m.input_dim != int(feature_dim) or m.n_genes != len(genes):
            raise ModelError(
                f"Each linear model must be one layer from {feature_dim} features to the {len(genes)} genes, "
                f"not {m.input_dim} features, hidden layers {list(m.hidden)}, {m.n_genes} outputs."
            )
    chosen = set(wanted)
    return [g for g in genes if g in chosen]


def check_weight(weight: float, n_linear: int, n_genes: int, what: str) -> float:
    """``weight`` as a float in (0, 1]; below 1 (a blend, :mod:`.blend`) every gene must be a linear gene."""
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise ModelError(f"{what} has a linear weight that is not a number: {weight!r}.") from None
    if not 0.0 < w <= 1.0:
        raise ModelError(f"{what} has a linear weight of {w:g}; it must lie in (0, 1].")
    if w < 1.0 and n_linear != n_genes:
        raise ModelError(
            f"{what} blends HE2RNA and the linear baseline (weight {w:g}) for {n_linear} of {n_genes} genes; "
            "a blend covers every gene."
        )
    return w


def linear_tensors(
    linear_models: Sequence[HE2RNA], genes: Sequence[str], linear_genes: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The tensors to store: per fold the rows of the linear genes, ``(L, d)`` weight and ``(L,)`` bias."""
    index = {g: i for i, g in enumerate(genes)}
    rows = torch.as_tensor([index[g] for g in linear_genes], dtype=torch.long)
    out = {}
    for f, m in enumerate(linear_models):
        layer = m.layers[0]
        w = layer.weight.detach().to("cpu", torch.float32).reshape(layer.weight.shape[0], -1)
        out[linear_key(f, "weight")] = w[rows].contiguous().clone()
        out[linear_key(f, "bias")] = layer.bias.detach().to("cpu", torch.float32)[rows].contiguous().clone()
    return out


def read_linear_weight(doc: Mapping, n_linear: int, n_genes: int, name: str) -> float:
    """The header's ``linear_weight`` (1 when absent: each linear gene from the linear map alone)."""
    if "linear_weight" not in doc:
        return 1.0
    return check_weight(doc["linear_weight"], n_linear, n_genes, name)


def read_linear_genes(doc: Mapping, genes: Sequence[str], aggregation: str, name: str) -> list[str]:
    """The header's ``linear_genes`` checked against the rest of it ([] when absent)."""
    raw = doc.get("linear_genes")
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(g, str) for g in raw):
        raise ModelError(f"{name} has a malformed list of linear-baseline genes.")
    known = set(genes)
    if any(g not in known for g in raw) or len(set(raw)) != len(raw):
        raise ModelError(f"{name} names linear-baseline genes that are not its own or are repeated.")
    if raw and aggregation != "topk":
        raise ModelError(f"{name} has linear-baseline genes with the {aggregation!r} aggregation.")
    chosen = set(raw)
    return [g for g in genes if g in chosen]


def linear_shapes(n_folds: int, n_linear: int, feature_dim: int) -> dict[str, tuple[int, ...]]:
    """The expected shapes of the stored linear maps."""
    if not n_linear:
        return {}
    shapes = {}
    for f in range(n_folds):
        shapes[linear_key(f, "weight")] = (n_linear, feature_dim)
        shapes[linear_key(f, "bias")] = (n_linear,)
    return shapes


def stored_linear_layers(tensors: Mapping[str, torch.Tensor], n_folds: int) -> list[Layer]:
    """The stored linear maps per fold as float32 ``(weight (L, d), bias (L,))``."""
    return [
        (
            tensors[linear_key(f, "weight")].to(torch.float32).contiguous(),
            tensors[linear_key(f, "bias")].to(torch.float32).contiguous(),
        )
        for f in range(n_folds)
    ]


def combine(
    layers: Sequence[Sequence[Layer]],
    linear: Sequence[Layer],
    rows: Sequence[int],
    feature_dim: int,
    weight: float = 1.0,
) -> tuple[list[list[Layer]], list[Layer | None]]:
    """Each fold's layers with the last one widened (see the module docstring) and its input map. With
    ``weight`` below 1 a linear gene's row is ``[(1 - weight) W_h, weight R]`` (its bias likewise): the blend
    of :mod:`.blend`, whose rows read every column.

    Returns ``(layers, input_maps)``: ``input_maps[f]`` is the ``(weight (w, d), bias (w,))`` making the
    extra hidden columns from the features, or None when they are the features themselves.
    """
    rows_t = torch.as_tensor(list(rows), dtype=torch.long)
    n_lin = len(rows_t)
    scores_first = n_lin <= feature_dim
    out_layers, maps = [], []
    for fold, (a, c) in zip(layers, linear, strict=True):
        w, b = fold[-1]
        width = n_lin if scores_first else feature_dim
        extra = w.new_zeros((w.shape[0], width))
        w_mlp, bias = w.clone(), b.clone()
        w_mlp[rows_t] *= 1.0 - weight
        bias[rows_t] *= 1.0 - weight
        if scores_first:  # the extra columns are the linear genes' scores: a row picks its own
            extra[rows_t, torch.arange(n_lin)] = weight
            maps.append((a, c))
        else:  # the extra columns are the features: a row is the gene's linear map
            extra[rows_t] = weight * a
            bias[rows_t] += weight * c
            maps.append(None)
        out_layers.append([*fold[:-1], (torch.cat([w_mlp, extra], dim=1).contiguous(), bias)])
    return out_layers, maps


def widen(h: torch.Tensor, x: torch.Tensor, input_map: Layer | None) -> torch.Tensor:
    """A fold's hidden activations ``h`` with the extra columns made from the features ``x``."""
    z = x if input_map is None else torch.addmm(input_map[1], x, input_map[0].T)
    return torch.cat([h, z], dim=1)


def split_rows(is_linear: torch.Tensor, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in ``sel`` of the HE2RNA genes and of the linear genes."""
    lin = is_linear[sel]
    return torch.nonzero(~lin).reshape(-1), torch.nonzero(lin).reshape(-1)


def mixed_scores(
    h: torch.Tensor, last: Layer, sel: torch.Tensor, is_linear: torch.Tensor, mlp_width: int
) -> torch.Tensor:
    """A fold's tile scores ``(N, len(sel))``: HE2RNA genes from the hidden columns, linear genes from the
    extra ones (each part only over its own columns: no product with the other part's zeros)."""
    w, b = last
    mlp_pos, lin_pos = split_rows(is_linear, sel)
    out = h.new_empty((h.shape[0], len(sel)))
    for pos, cols in ((mlp_pos, slice(None, mlp_width)), (lin_pos, slice(mlp_width, None))):
        if len(pos):
            rows = sel[pos]
            out[:, pos] = torch.addmm(b[rows], h[:, cols], w[rows, cols].T)
    return out


def linear_columns(bundle: ModelBundle, genes: Sequence[str] | str | None, n_columns: int) -> torch.Tensor:
    """Bool ``(n_columns,)``: which columns of scores of ``genes`` (None: all) are linear genes."""
    idx = bundle.gene_index(genes)
    if len(idx) != n_columns:
        raise ModelError(
            f"Scores of {n_columns} columns were given for {len(idx)} genes: pass the genes they belong to."
        )
    mask = torch.zeros(len(bundle.genes), dtype=torch.bool)
    mask[bundle.gene_index(bundle.linear_genes)] = True
    return mask[torch.as_tensor(idx, dtype=torch.long)]


def model_of_genes(bundle: ModelBundle, genes: Sequence[str] | str) -> str:
    """Which model makes the map of a gene or of a set of genes: :data:`HE2RNA_NAME`, :data:`LINEAR_NAME`
    or, for a set whose genes come from both, :data:`BOTH_NAME`."""
    genes = [genes] if isinstance(genes, str) else list(genes)
    bundle.gene_index(genes)  # unknown names: GeneError
    if is_blend(bundle):
        return BLEND_NAME
    return _model_name(set(getattr(bundle, "linear_genes", None) or []), genes)


def is_blend(bundle: ModelBundle) -> bool:
    """Whether every gene of ``bundle`` is HE2RNA and the linear baseline averaged (``linear_weight < 1``)."""
    return bool(getattr(bundle, "linear_genes", None)) and float(getattr(bundle, "linear_weight", 1.0)) < 1.0


def _model_name(linear: set[str], genes: Sequence[str]) -> str:
    kinds = {g in linear for g in genes}
    if kinds == {True}:
        return LINEAR_NAME
    return BOTH_NAME if kinds == {True, False} else HE2RNA_NAME


def map_models(bundle: ModelBundle, resolved: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``{map name: model}`` of resolved names (``name -> model genes``), for the export sidecars."""
    if is_blend(bundle):
        return {str(name): BLEND_NAME for name in resolved}
    linear = set(getattr(bundle, "linear_genes", None) or [])
    return {str(name): _model_name(linear, list(genes)) for name, genes in resolved.items()}


def describe_linear(
    genes: Sequence[str], linear_genes: Sequence[str], weight: float = 1.0, training: Mapping | None = None
) -> str:
    """The sentences of ``ModelBundle.describe`` about the linear baseline: its genes ("" when there are
    none), and an anchor of HE2RNA's tile scores to it in training (``training``: the bundle's ``training``
    metadata, :meth:`napari_he2rna.model.training.TrainConfig.fingerprint`)."""
    anchor = (training or {}).get("anchor") if isinstance(training, Mapping) else None
    if isinstance(anchor, (int, float)) and anchor > 0:
        held = (
            f"HE2RNA's tile scores were held near the {LINEAR_NAME}'s map in training (anchor {anchor:g}: "
            "that times their mean squared difference added to the loss)."
        )
        return " ".join(x for x in (describe_linear(genes, linear_genes, weight), held) if x)
    if not linear_genes:
        return ""
    if weight < 1.0:
        return (
            f"Every gene's tile score is {1 - weight:g} x HE2RNA's + {weight:g} x the {LINEAR_NAME}'s "
            "(ridge on the slide-mean feature), fold by fold; the slide prediction aggregates it as HE2RNA "
            "does (--model-type ensemble)."
        )
    shown = ", ".join(linear_genes[:LISTED])
    more = f" (+{len(linear_genes) - LISTED} more)" if len(linear_genes) > LISTED else ""
    return (
        f"{len(linear_genes)} of {len(genes)} genes from the {LINEAR_NAME} (ridge on the slide-mean feature, "
        f"slide prediction the mean of the tile scores): {shown}{more}."
    )
