"""The HE2RNA network, its top-k aggregation, and the one-file model bundle.

Re-implemented from the Methods of Schmauch et al. (2020), *A deep learning model to predict RNA-Seq
expression of tumours from whole slide images*: an MLP applied to every (super)tile independently
(1D convolutions of kernel 1), ReLU, dropout between layers, one score per tile per gene; a slide's prediction
for a gene is the mean of its k highest tile scores, k drawn from ``L`` at each training step and averaged
over every k in ``L`` at inference.

A model is shipped as ONE ``.safetensors`` file: the weights of every cross-validation fold (keys prefixed
``fold{i}.``) and a JSON document in the safetensors header (genes, backbone, feature size, tile size, hidden
sizes, k lists, training summary, validation R, a checksum). Loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import GeneError, ModelError

FORMAT_NAME = "napari-he2rna-model"
FORMAT_VERSION = 1

#: The paper's k lists: supertile data (100 per slide) and full-scale data (up to 8,000 tiles per slide).
SUPERTILE_KS: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
FULL_TILE_KS: tuple[int, ...] = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
#: How a slide's prediction is made from its tile scores.
AGGREGATIONS = ("topk", "mean")


# --------------------------------------------------------------------------------------------- network


class HE2RNA(nn.Module):
    """The per-tile MLP of HE2RNA.

    Every tile goes through the same layers (a 1D convolution of kernel 1 is a dense layer shared by the
    tiles); ReLU and dropout sit between consecutive layers, the output layer is linear.

    Parameters
    ----------
    input_dim
        Features per tile (2048 for ResNet50).
    n_genes
        Outputs per tile.
    hidden
        Sizes of the hidden layers (paper: ``(1024, 1024)`` for all genes, ``(256, 256)`` for gene subsets).
    dropout
        Dropout probability between layers (paper: 0.25).
    output_bias
        ``(n_genes,)`` initial bias of the output layer, the mean training target, so that training starts
        from the mean expression instead of zero.
    """

    def __init__(
        self,
        input_dim: int,
        n_genes: int,
        hidden: Sequence[int] = (1024, 1024),
        dropout: float = 0.25,
        output_bias: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        self.n_genes = int(n_genes)
        self.hidden = tuple(int(h) for h in hidden)
        self.dropout_p = float(dropout)
        sizes = [self.input_dim, *self.hidden, self.n_genes]
        self.layers = nn.ModuleList(
            nn.Conv1d(a, b, kernel_size=1) for a, b in zip(sizes[:-1], sizes[1:], strict=False)
        )
        self.dropout = nn.Dropout(self.dropout_p)
        if output_bias is not None:
            self.set_output_bias(output_bias)

    def set_output_bias(self, bias: np.ndarray | torch.Tensor) -> None:
        """Set the output layer's bias, ``(n_genes,)`` (e.g. to the mean training target)."""
        bias = torch.as_tensor(np.asarray(bias, dtype=np.float32)).reshape(-1)
        if bias.numel() != self.n_genes:
            raise ValueError(f"output bias has {bias.numel()} values for {self.n_genes} genes")
        with torch.no_grad():
            self.layers[-1].bias.copy_(bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tile scores.

        Parameters
        ----------
        x
            ``(B, input_dim, N)`` tile features.
        mask
            ``(B, N)`` bool, True for real tiles. Padded tiles get a score of 0 (they never enter the top-k
            when :func:`topk_mean` is given the same mask).

        Returns
        -------
        torch.Tensor
            ``(B, n_genes, N)`` one score per gene per tile.
        """
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.dropout(torch.relu(h))
        if mask is not None:
            h = h * mask[:, None, :].to(h.dtype)
        return h

    def predict(self, x: torch.Tensor, mask: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
        """Slide predictions ``(B, n_genes)``: the mean over k in ``ks`` of the top-k mean of tile scores."""
        return topk_mean_multi(self(x, mask), mask, ks)


def _sorted_valid(scores: torch.Tensor, mask: torch.Tensor | None, k_max: int):
    """Top ``k_max`` scores per (slide, gene), sorted descending, padded tiles pushed to the end."""
    b, _, n = scores.shape
    if mask is None:
        mask = torch.ones((b, n), dtype=torch.bool, device=scores.device)
    mask = mask.to(torch.bool)
    # A finite sentinel, not -inf: 0 * -inf would be NaN in the weighted sums below (and in gradients).
    low = torch.finfo(scores.dtype).min
    masked = scores.masked_fill(~mask[:, None, :], low)
    k_max = max(1, min(int(k_max), n))
    top = torch.topk(masked, k_max, dim=2, sorted=True).values  # (B, G, k_max)
    n_valid = mask.sum(dim=1)  # (B,)
    return top, n_valid


def topk_mean(scores: torch.Tensor, mask: torch.Tensor | None, k: int) -> torch.Tensor:
    """Per slide and gene, the mean of the k highest scores of the valid (unpadded) tiles.

    Parameters
    ----------
    scores
        ``(B, G, N)`` tile scores.
    mask
        ``(B, N)`` bool, True for real tiles; ``None`` means all tiles are real.
    k
        How many top tiles to average; when a slide has fewer valid tiles, all of them are averaged.

    Returns
    -------
    torch.Tensor
        ``(B, G)``; NaN for a slide without any valid tile.
    """
    top, n_valid = _sorted_valid(scores, mask, k)
    k_eff = torch.clamp(n_valid, max=int(k))  # (B,)
    pos = torch.arange(top.shape[2], device=scores.device)
    keep = pos[None, :] < k_eff[:, None]  # (B, k)
    total = torch.where(keep[:, None, :], top, torch.zeros_like(top)).sum(dim=2)
    out = total / k_eff.clamp(min=1)[:, None].to(scores.dtype)
    return torch.where((n_valid > 0)[:, None], out, torch.full_like(out, float("nan")))


def topk_mean_multi(scores: torch.Tensor, mask: torch.Tensor | None, ks: Sequence[int]) -> torch.Tensor:
    """Inference aggregation ``(B, G)``: the mean over k in ``ks`` of :func:`topk_mean`.

    One sort and a cumulative sum serve every k, instead of one top-k per k.
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError("ks must be a non-empty list of positive integers")
    top, n_valid = _sorted_valid(scores, mask, max(ks))
    # Zero out sentinel values so the cumulative sum stays finite; they are never indexed below.
    pos = torch.arange(top.shape[2], device=scores.device)
    valid_pos = pos[None, :] < n_valid[:, None]
    top = torch.where(valid_pos[:, None, :], top, torch.zeros_like(top))
    csum = torch.cumsum(top, dim=2)  # (B, G, k_max)
    out = torch.zeros(top.shape[:2], dtype=scores.dtype, device=scores.device)
    for k in ks:
        k_eff = torch.clamp(n_valid, min=1, max=min(k, top.shape[2]))  # (B,)
        idx = (k_eff - 1)[:, None, None].expand(-1, top.shape[1], 1)
        out = out + csum.gather(2, idx)[..., 0] / k_eff[:, None].to(scores.dtype)
    out = out / len(ks)
    return torch.where((n_valid > 0)[:, None], out, torch.full_like(out, float("nan")))


# ---------------------------------------------------------------------------------------------- bundle


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
        mean) or ``"mean"`` (every tile; the linear baseline).

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

    tensors: dict[str, torch.Tensor] = {}
    for i, m in enumerate(models):
        for key, value in m.state_dict().items():
            tensors[f"fold{i}.{key}"] = value.detach().to("cpu", torch.float32).contiguous().clone()

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
    doc_json = json.dumps(doc, default=json_default, sort_keys=True, allow_nan=True)
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "he2rna": doc_json,
        "sha256": _tensor_digest(tensors, doc_json),
    }
    atomic_write_bytes(path, save(tensors, metadata=header))
    return path


#: How PyTorch checkpoints start: a zip archive (torch.save since 1.6) or a raw pickle (protocol 2+).
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


def _looks_like_checkpoint(data: bytes) -> bool:
    """A zip archive, or a pickle of protocol 2-5 (``\x80`` then the protocol byte), where no valid
    safetensors header is (a safetensors length can start with ``\x80`` too: this is asked only after)."""
    zip_or_pickle = data.startswith(_CHECKPOINT_MAGIC[0]) or data.startswith(_CHECKPOINT_MAGIC[1])
    return zip_or_pickle and (data[0] != 0x80 or (len(data) > 1 and 2 <= data[1] <= 5))


def _not_a_bundle(data: bytes, name: str, why: str) -> ModelError:
    if _looks_like_checkpoint(data):
        return ModelError(
            f"{name} is a PyTorch checkpoint (a pickle), not a model bundle; convert it with "
            "`he2rna convert` (checkpoints are never unpickled at load time)."
        )
    return ModelError(why)


def _read_header(data: bytes, name: str) -> dict:
    if len(data) >= 9 and data[8:9] != b"{" and _looks_like_checkpoint(data):
        raise _not_a_bundle(data, name, "")
    if len(data) < 8:
        raise ModelError(f"{name} is not a model bundle: the file is too short.")
    (n,) = struct.unpack("<Q", data[:8])
    if n <= 0 or 8 + n > len(data):
        why = f"{name} is not a valid model bundle: its header is truncated or corrupt."
        raise _not_a_bundle(data, name, why)
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{name} is not a valid model bundle: its header is not valid JSON.") from None
    if not isinstance(header, dict):
        raise ModelError(f"{name} is not a valid model bundle: its header is not a JSON object.")
    return header


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

    ``layers[f]`` holds the (weight ``(out, in)``, bias ``(out,)``) float32 pairs of fold ``f``.
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
    _gene_index: dict[str, int] = field(default_factory=dict, repr=False)
    _hidden_cache: tuple | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._gene_index = {g: i for i, g in enumerate(self.genes)}

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
            f"HE2RNA model: {len(self.genes)} genes, ensemble of {self.n_folds} fold(s), "
            f"hidden layers {list(self.hidden)}, backbone '{self.backbone}' ({self.feature_dim} features), "
            f"tiles of {self.tile_um:g} µm, k in {list(self.ks)}."
        ]
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
        return " ".join(parts)

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
        :class:`~napari_he2rna.session.SlideSession`, own their cache)."""
        x = self._as_tensor(features)
        outs = []
        with torch.no_grad():
            for fold in self.layers:
                parts = []
                for start in range(0, x.shape[0], chunk):
                    h = x[start : start + chunk]
                    for w, b in fold[:-1]:
                        h = torch.relu(torch.addmm(b, h, w.T))
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
                w, b = fold[-1]
                # Only the requested output rows: one gene for 8,000 tiles is one (N, h) x (h,) product.
                scores.append(torch.addmm(b[sel], h, w[sel].T))  # (N, len(genes))
        return scores

    def _hidden(self, x: torch.Tensor, chunk: int) -> list[torch.Tensor]:
        """:meth:`hidden_activations`, cached for the last feature matrix seen.

        The hidden layers do not depend on the gene; caching them makes picking genes one after the other
        cost one small matrix product each.
        """
        key = (tuple(x.shape), hashlib.blake2b(x.numpy().tobytes(), digest_size=16).hexdigest())
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

    def slide_prediction(self, features: np.ndarray, genes: Sequence[str] | str | None = None) -> np.ndarray:
        """Slide-level prediction ``(len(genes),)``: per fold, the mean over k in ``ks`` of the top-k mean of
        the tile scores (``aggregation == "topk"``) or the mean of all tile scores (``"mean"``, the linear
        baseline), then averaged over folds (each fold model was trained with its own aggregation)."""
        scores, _ = self._fold_scores(features, genes)
        return self.aggregate_fold_scores(scores)

    def aggregate_fold_scores(self, scores: Sequence[torch.Tensor]) -> np.ndarray:
        """Slide-level prediction from per-fold tile scores ``(N, G)`` (see :meth:`slide_prediction`)."""
        preds = []
        for s in scores:
            if self.aggregation == "mean":
                preds.append(s.mean(dim=0))
                continue
            preds.append(topk_mean_multi(s.T[None], None, self.ks)[0])
        return torch.stack(preds).mean(dim=0).numpy()

    def to_modules(self) -> list[HE2RNA]:
        """The fold models as :class:`HE2RNA` modules (e.g. to fine-tune them)."""
        out = []
        for fold in self.layers:
            m = HE2RNA(self.feature_dim, len(self.genes), self.hidden, self.dropout)
            with torch.no_grad():
                for layer, (w, b) in zip(m.layers, fold, strict=False):
                    layer.weight.copy_(w[:, :, None])
                    layer.bias.copy_(b)
            out.append(m)
        return out


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

    header = _read_header(data, name)
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
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ModelError(f"{name} has incomplete or malformed model metadata ({exc!s}).") from None
    if aggregation not in AGGREGATIONS:
        raise ModelError(f"{name} has an unknown aggregation {aggregation!r}.")
    if not genes or n_folds < 1 or not ks or feature_dim < 1:
        raise ModelError(f"{name} has incomplete model metadata (no genes, folds, k list or feature size).")

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{name} is corrupt: its weights cannot be read ({exc}).") from None

    expected = {
        f"fold{f}.{k}": s
        for f in range(n_folds)
        for k, s in _layer_shapes(feature_dim, hidden, len(genes)).items()
    }
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
    )


# ------------------------------------------------------------------------------------------- converter


def _extract_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint (plain state dict or one nested under a usual key)."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            if key in obj and isinstance(obj[key], Mapping):
                return _extract_state_dict(obj[key], name)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ModelError(f"{name} holds no state dict of tensors (a whole pickled model is not accepted).")


def _layers_from_state_dict(
    sd: Mapping[str, torch.Tensor], name: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Map a state dict onto (weight, bias) pairs by order and shape.

    Weights are 3-D ``(out, in, 1)`` (Conv1d, kernel 1) or 2-D ``(out, in)`` (Linear); each is followed by its
    ``(out,)`` bias. Anything else (batch norm, attention, ...) means another architecture: refused.
    """
    items = [(k, v) for k, v in sd.items() if v.is_floating_point()]
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    i = 0
    while i < len(items):
        key, w = items[i]
        if w.ndim == 3 and w.shape[2] == 1:
            w2 = w[:, :, 0]
        elif w.ndim == 2:
            w2 = w
        else:
            raise ModelError(
                f"{name}: tensor '{key}' of shape {tuple(w.shape)} is not a layer of the HE2RNA MLP "
                "(expected 1x1 convolutions or dense layers)."
            )
        if i + 1 >= len(items) or items[i + 1][1].ndim != 1 or items[i + 1][1].shape[0] != w2.shape[0]:
            raise ModelError(f"{name}: layer '{key}' has no bias of size {w2.shape[0]} after it.")
        layers.append((w2.to(torch.float32).contiguous(), items[i + 1][1].to(torch.float32).contiguous()))
        i += 2
    if not layers:
        raise ModelError(f"{name} contains no layer weights.")
    for (w_prev, _), (w_next, _) in zip(layers[:-1], layers[1:], strict=False):
        if w_next.shape[1] != w_prev.shape[0]:
            raise ModelError(
                f"{name}: consecutive layers do not chain "
                f"({w_prev.shape[0]} outputs feed {w_next.shape[1]} inputs)."
            )
    return layers


def convert_checkpoint(
    src: str | Path | Sequence[str | Path],
    out: str | Path,
    genes: Sequence[str] | str | Path,
    backbone: str = "resnet50-imagenet",
    feature_dim: int | None = None,
    tile_um: float = 112.0,
    ks: Sequence[int] = SUPERTILE_KS,
    dropout: float = 0.25,
    metadata: Mapping[str, Any] | None = None,
    demo: bool = False,
) -> Path:
    """Convert PyTorch HE2RNA checkpoints into one model bundle.

    Accepts plain state dicts in the paper's layout (a sequence of Conv1d kernel-1 layers, or dense layers)
    and the ``he2rna-{cancer}-{fold}`` checkpoints published by the SEQUOIA authors (state dicts of the same
    kind of MLP). Keys are mapped by order and shape; a checkpoint that does not fit is refused with a
    :class:`ModelError`. Files are read with ``torch.load(weights_only=True)``: no pickled code runs.

    Parameters
    ----------
    src
        A checkpoint file, a folder of them (``*.pt``/``*.pth``/``*.bin``/``*.ckpt``, sorted by name; one per
        fold), or a list of files. All folds are put in one ensemble.
    out
        The ``.safetensors`` bundle to write.
    genes
        Output names in order, or a text file with one name per line.
    backbone, feature_dim, tile_um, ks, dropout
        What the model expects (``feature_dim`` defaults to the first layer's input size).
    """
    if isinstance(src, (str, Path)):
        p = Path(src)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in {".pt", ".pth", ".bin", ".ckpt"})
            if not files:
                raise ModelError(f"No checkpoint files (.pt, .pth, .bin, .ckpt) in {p}.")
        else:
            files = [p]
    else:
        files = [Path(s) for s in src]
    if isinstance(genes, (str, Path)) and Path(genes).is_file():
        genes = [ln.strip() for ln in Path(genes).read_text().splitlines() if ln.strip()]
    genes = [str(g) for g in genes]

    folds = []
    for f in files:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ModelError(f"Checkpoint {f} does not exist.") from None
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds (UnpicklingError, RuntimeError...)
            raise ModelError(
                f"{f.name} cannot be read as a weights-only PyTorch checkpoint ({type(exc).__name__})."
            ) from None
        folds.append(_layers_from_state_dict(_extract_state_dict(obj, f.name), f.name))

    first = folds[0]
    shapes = [tuple(w.shape) for w, _ in first]
    for f, fold in zip(files, folds, strict=False):
        if [tuple(w.shape) for w, _ in fold] != shapes:
            raise ModelError(f"{f.name} has another architecture than {files[0].name}; folds must match.")
    in_dim = first[0][0].shape[1]
    n_out = first[-1][0].shape[0]
    if feature_dim is not None and int(feature_dim) != in_dim:
        raise ModelError(f"The checkpoint takes {in_dim} features per tile, not {feature_dim}.")
    if len(genes) != n_out:
        raise ModelError(f"The checkpoint predicts {n_out} outputs but {len(genes)} gene names were given.")
    hidden = [w.shape[0] for w, _ in first[:-1]]
    models = []
    for fold in folds:
        m = HE2RNA(in_dim, n_out, hidden, dropout)
        with torch.no_grad():
            for layer, (w, b) in zip(m.layers, fold, strict=False):
                layer.weight.copy_(w[:, :, None])
                layer.bias.copy_(b)
        models.append(m)
    extra = dict(metadata or {})
    extra.setdefault("converted_from", [f.name for f in files])
    return save_bundle(out, models, genes, backbone, in_dim, tile_um, ks, extra, demo)
