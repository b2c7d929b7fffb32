"""Converters of published HE2RNA weights into a model bundle.

Three kinds of source, each one fold of an ensemble (several sources: the folds, averaged at inference):

* PyTorch checkpoints in the paper's layout (1x1 convolutions or dense layers; ``*.pt``, ``*.pth``,
  ``*.bin``, ``*.ckpt``), read with ``torch.load(weights_only=True)``: no pickled code runs;
* snapshot folders in the ``PyTorchModelHubMixin`` layout the SEQUOIA authors published their HE2RNA
  re-trainings in (``model.safetensors`` with ``conv0``/``conv1``/``conv2`` ``.weight`` ``[out, in, 1]`` and
  ``.bias``, and an optional ``config.json`` of the init arguments: ``input_dim``, ``output_dim``,
  ``layers``, ``ks``, ``dropout``); ``.safetensors`` files are read with safetensors only;
* hub ids (``gevaertlab/he2rna-brca-0``), fetched into and read from the Hugging Face cache exactly as the
  foundation backbones are (:func:`napari_he2rna.features.hub.hub_snapshot_files`: ``HF_HUB_OFFLINE`` /
  ``HE2RNA_OFFLINE``, gated repos, missing logins).

The architecture comes from the tensors (checked against ``config.json`` where there is one). The gene list is
a text file (one name a line) or a CSV/TSV with a ``gene`` (or ``symbol``) column. ``preset="sequoia-he2rna"``
records SEQUOIA's preprocessing in the bundle (:data:`PRESETS`).
"""

from __future__ import annotations

import csv
import importlib.util
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import He2rnaWarning, MissingExtraError, ModelError
from ..slides.tiling import UM_PER_PX_AT_1X
from .aggregation import Clustering
from .bundle import save_bundle
from .network import HE2RNA, SUPERTILE_KS

#: Files read with ``torch.load(weights_only=True)``.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: The unit of HE2RNA's outputs unless told otherwise (TCGA's FPKM-UQ, log-scaled as in the paper).
DEFAULT_UNIT = "log10(1+FPKM-UQ)"
#: How the hub messages name what is fetched, and how they say to pass a downloaded snapshot instead.
HUB_NAME = "HE2RNA"
FOLDER_HINT = "(e.g. he2rna-brca-0/, as `huggingface-cli download` writes it) in place of the hub id"
#: The name of SEQUOIA's HE2RNA snapshots (``gevaertlab/he2rna-{cancer}-{fold}``).
SEQUOIA_NAME = re.compile(r"he2rna-[a-z]+-\d+$")
#: Header names of the gene column of a CSV/TSV gene list, in order of preference (case-insensitive).
GENE_COLUMNS = ("gene", "symbol", "gene_symbol", "gene_name", "genes")

#: What a converted model records of the preprocessing its weights were trained with.
PRESETS: dict[str, dict[str, Any]] = {
    # SEQUOIA's HE2RNA re-trainings (gevaertlab/he2rna-{cancer}-{fold}): ResNet50-ImageNet features of 256 px
    # tiles at 20x fed without resizing, per slide the means of 100 k-means clusters of the tile features,
    # k in (1, 2, 5, 10, 20, 50, 100) averaged at inference; targets log-scaled FPKM-UQ of GDC STAR counts.
    "sequoia-he2rna": {
        "backbone": "resnet50-imagenet",
        "tile_px": 256,
        "tile_magnification": 20.0,
        "input_resize": False,
        "aggregation": "kmeans",
        "clustering": Clustering(n_clusters=100, random_state=0, n_init=10),
        "ks": SUPERTILE_KS,
        "unit": DEFAULT_UNIT,
    },
}
_DEFAULTS: dict[str, Any] = {
    "backbone": "resnet50-imagenet",
    "tile_um": None,
    "tile_px": None,
    "tile_magnification": None,
    "input_resize": True,
    "aggregation": "topk",
    "clustering": None,
    "ks": SUPERTILE_KS,
    "dropout": 0.25,
    "unit": DEFAULT_UNIT,
}


@dataclass(frozen=True)
class FoldSource:
    """One fold's weights: ``label`` (file or folder name, or hub id) for messages and metadata, its weight
    files (several for a sharded snapshot) and its ``config.json`` if it has one."""

    label: str
    weights: tuple[Path, ...]
    config: Path | None = None


# ---------------------------------------------------------------------------------------------- sources


def _natural_key(text: str) -> list:
    """Sort key where digit runs compare as numbers (``conv2`` before ``conv10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _is_snapshot(folder: Path) -> bool:
    """A ``PyTorchModelHubMixin`` snapshot folder: weights under the hub's file names."""
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return any((folder / n).is_file() for n in names)


def _snapshot_source(folder: Path) -> FoldSource:
    from ..features.hub import folder_model_files, hub_id_of_folder

    config, weights = folder_model_files(HUB_NAME, folder)
    return FoldSource(hub_id_of_folder(folder) or folder.name, tuple(weights), config)


def _hub_source(hub_id: str) -> FoldSource:
    """The weights (and config.json) of a hub repo, from the Hugging Face cache or the hub."""
    from ..features.hub import FOUNDATION_EXTRA, hub_offline, hub_snapshot_files

    if importlib.util.find_spec("huggingface_hub") is None:
        raise MissingExtraError(
            f"the hub id {hub_id} needs huggingface_hub, which is not installed: pip install "
            f"'{FOUNDATION_EXTRA}' (or pip install huggingface_hub), or pass a downloaded snapshot folder."
        )

    local_only = hub_offline()
    found = hub_snapshot_files(
        HUB_NAME, hub_id, ["model.safetensors", "config.json"], local_only, folder_hint=FOLDER_HINT
    )
    weights = found["model.safetensors"]
    if weights is None:  # older PyTorchModelHubMixin versions saved a pickle
        weights = hub_snapshot_files(
            HUB_NAME, hub_id, ["pytorch_model.bin"], local_only, optional=True, folder_hint=FOLDER_HINT
        )["pytorch_model.bin"]
    if weights is None:
        where = "in the Hugging Face cache (the hub is offline)" if local_only else "on the Hugging Face hub"
        raise ModelError(
            f"{hub_id} has no model.safetensors or pytorch_model.bin {where}: it is not an HE2RNA snapshot."
        )
    return FoldSource(hub_id, (weights,), found["config.json"])


def _sources_of(item: str | Path) -> list[FoldSource]:
    from ..features.hub import HUB_ID

    p = Path(item).expanduser()
    if p.is_dir():
        if _is_snapshot(p):
            return [_snapshot_source(p)]
        suffixes = (*CHECKPOINT_SUFFIXES, ".safetensors")
        files = sorted(
            (f for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes),
            key=lambda f: _natural_key(f.name),
        )
        if files:
            return [FoldSource(f.name, (f,)) for f in files]
        folders = sorted(
            (d for d in p.iterdir() if d.is_dir() and _is_snapshot(d)), key=lambda d: _natural_key(d.name)
        )
        if folders:  # a folder of downloaded snapshot folders, one per fold
            return [_snapshot_source(d) for d in folders]
        raise ModelError(
            f"No checkpoint files (.pt, .pth, .bin, .ckpt, .safetensors) or snapshot folders "
            f"(model.safetensors, optional config.json) in {p}."
        )
    if p.is_file():
        beside = p.parent / "config.json"
        own = p.name in ("model.safetensors", "pytorch_model.bin") and beside.is_file()
        return [FoldSource(p.name, (p,), beside if own else None)]
    match = HUB_ID.match(str(item))
    if match and p.suffix.lower() not in (*CHECKPOINT_SUFFIXES, ".safetensors"):  # not a missing file
        return [_hub_source(match.group(1))]
    raise ModelError(
        f"{item} does not exist: give checkpoint files, snapshot folders (model.safetensors, config.json) or "
        "hub ids such as gevaertlab/he2rna-brca-0."
    )


def fold_sources(src: str | Path | Sequence[str | Path]) -> list[FoldSource]:
    """The folds of ``src``: checkpoint files, snapshot folders, folders of either, or hub ids, in order."""
    items = [src] if isinstance(src, (str, Path)) else list(src)
    if not items:
        raise ModelError("No checkpoint, snapshot folder or hub id to convert.")
    return [source for item in items for source in _sources_of(item)]


# ------------------------------------------------------------------------------------------ the weights


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


def _by_layer(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A safetensors state dict (stored sorted by name, so ``conv0.bias`` before ``conv0.weight``) in layer
    order: per layer name in natural order (``conv2`` before ``conv10``) its weight, then its bias."""
    prefixes = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith((".weight", ".bias"))}, key=_natural_key)
    ordered = {k: sd[k] for p in prefixes for k in (f"{p}.weight", f"{p}.bias") if k in sd}
    ordered.update({k: sd[k] for k in sorted(sd, key=_natural_key) if k not in ordered})
    return ordered


def _read_weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of one file: safetensors for ``.safetensors`` (in layer order), else a weights-only
    ``torch.load``."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _by_layer(load_file(str(path), device="cpu"))
        except FileNotFoundError:
            raise ModelError(f"Weights file {path} does not exist.") from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"{name} cannot be read as a safetensors file ({exc}).") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"Checkpoint {path} does not exist.") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds (UnpicklingError, RuntimeError...)
        raise ModelError(
            f"{name} cannot be read as a weights-only PyTorch checkpoint ({type(exc).__name__})."
        ) from None
    return _extract_state_dict(obj, name)


def read_fold(source: FoldSource) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (weight ``(out, in)``, bias ``(out,)``) float32 layers of one fold, first to last."""
    state: dict[str, torch.Tensor] = {}
    for path in source.weights:
        state.update(_read_weights(path, source.label))
    return _layers_from_state_dict(state, source.label)


def _fold_config(source: FoldSource) -> dict[str, Any]:
    """The init arguments in a snapshot's config.json that describe the network (``{}`` without one)."""
    from ..features.hub import read_json

    doc = read_json(source.config) if source.config is not None else {}
    return {
        k: doc[k] for k in ("input_dim", "output_dim", "layers", "ks", "dropout") if doc.get(k) is not None
    }


def _check_config(source: FoldSource, config: Mapping[str, Any], layers: list) -> None:
    """Refuse a config.json that describes another network than the tensors beside it."""
    seen = {
        "input_dim": int(layers[0][0].shape[1]),
        "output_dim": int(layers[-1][0].shape[0]),
        "layers": [int(w.shape[0]) for w, _ in layers[:-1]],
    }
    for key, value in seen.items():
        if key not in config:
            continue
        said = [int(v) for v in config[key]] if key == "layers" else int(config[key])
        if said != value:
            raise ModelError(
                f"The config.json of {source.label} says {key} {said} but its weights have {value}."
            )


# -------------------------------------------------------------------------------------------- gene list


def read_gene_list(path: str | Path) -> list[str]:
    """Gene names in output order from a text file (one a line; ``#`` comments and blank lines skipped) or a
    CSV/TSV with a ``gene`` (or ``symbol``) column, whose header is never taken for a gene.

    A one-column file whose first line is a column name (``gene``, ``symbol``, ...) has that line as its
    header, whatever its suffix (SEQUOIA's ``examples/gene_list.csv`` starts with ``gene``).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ModelError(f"Gene list {p} does not exist (one gene name per line, in output order).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"Gene list {p} cannot be read ({exc}).") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ModelError(f"Gene list {p} names no gene.")
    delimiter = "\t" if "\t" in lines[0] else "," if "," in lines[0] else None
    if delimiter is None:
        rows = [[ln.strip()] for ln in lines]
    else:
        rows = [[cell.strip() for cell in row] for row in csv.reader(lines, delimiter=delimiter)]
    header = [cell.lower() for cell in rows[0]]
    column = next((header.index(name) for name in GENE_COLUMNS if name in header), None)
    if column is None and len(header) > 1:
        raise ModelError(
            f"Gene list {p} has columns {', '.join(rows[0][:6])} but none named gene or symbol; name the "
            "column of gene names gene (or give one name per line)."
        )
    body = rows[1:] if column is not None else rows
    column = column or 0
    genes = [row[column] if column < len(row) else "" for row in body]
    if not genes:
        raise ModelError(f"Gene list {p} names no gene (only a header).")
    empty = [i for i, g in enumerate(genes) if not g]
    if empty:
        raise ModelError(f"Gene list {p} has an empty gene name on data line {empty[0] + 1}.")
    seen: set[str] = set()
    twice = [g for g in genes if g in seen or seen.add(g)]
    if twice:
        raise ModelError(f"Gene list {p} names {twice[0]} twice; every output needs its own name.")
    return genes


# ------------------------------------------------------------------------------------------- converting


def convert_checkpoint(
    src: str | Path | Sequence[str | Path],
    out: str | Path,
    genes: Sequence[str] | str | Path,
    backbone: str | None = None,
    feature_dim: int | None = None,
    tile_um: float | None = None,
    ks: Sequence[int] | None = None,
    dropout: float | None = None,
    metadata: Mapping[str, Any] | None = None,
    demo: bool = False,
    *,
    preset: str | None = None,
    unit: str | None = None,
    aggregation: str | None = None,
    tile_px: int | None = None,
    tile_magnification: float | None = None,
    input_resize: bool | None = None,
    clustering: Clustering | None = None,
) -> Path:
    """Convert published HE2RNA weights (checkpoints, snapshot folders, hub ids) into one model bundle.

    Accepts plain state dicts in the paper's layout (a sequence of Conv1d kernel-1 layers, or dense layers)
    and the ``he2rna-{cancer}-{fold}`` weights published by the SEQUOIA authors (``PyTorchModelHubMixin``
    snapshots of the same kind of MLP: ``conv0``, ``conv1``, ``conv2``). Layers are mapped by order and shape
    (by name order for safetensors); weights that do not fit are refused with a :class:`ModelError`.
    Checkpoints are read with ``torch.load(weights_only=True)`` (no pickled code runs), ``.safetensors``
    with safetensors.

    Parameters
    ----------
    src
        A checkpoint file, a snapshot folder, a hub id (``gevaertlab/he2rna-brca-0``), a folder of checkpoint
        files or of snapshot folders (one per fold, in natural name order), or a list of any of these. All
        folds are put in one ensemble.
    out
        The ``.safetensors`` bundle to write.
    genes
        Output names in order, or a gene list file (:func:`read_gene_list`).
    backbone, feature_dim, tile_um, ks, dropout
        What the model expects (``feature_dim`` defaults to the first layer's input size; ``ks`` and
        ``dropout`` to the snapshot's config.json, else the preset's, else the paper's supertile k list and
        0.25; ``tile_um`` to ``tile_px`` at the nominal 10 / ``tile_magnification`` µm per pixel, else 112).
    metadata, demo
        As :func:`~napari_he2rna.model.bundle.save_bundle`.
    preset
        A name in :data:`PRESETS` (``"sequoia-he2rna"``): every setting it holds, unless given here.
    unit
        What the outputs are in (``metadata["output_unit"]``, shown by the viewer); default
        :data:`DEFAULT_UNIT`.
    aggregation, tile_px, tile_magnification, input_resize, clustering
        The preprocessing recorded in the bundle (:func:`~napari_he2rna.model.bundle.save_bundle`).
    """
    if preset is not None and preset not in PRESETS:
        raise ModelError(f"Unknown preset {preset!r} (known: {', '.join(PRESETS)}).")
    given = {
        "backbone": backbone,
        "tile_um": tile_um,
        "tile_px": tile_px,
        "tile_magnification": tile_magnification,
        "input_resize": input_resize,
        "aggregation": aggregation,
        "clustering": clustering,
        "ks": ks,
        "dropout": dropout,
        "unit": unit,
    }
    explicit = {k: v for k, v in given.items() if v is not None}
    sources = fold_sources(src)
    gene_names = read_gene_list(genes) if isinstance(genes, (str, Path)) else [str(g) for g in genes]
    gene_source = f" ({Path(genes).name})" if isinstance(genes, (str, Path)) else ""

    folds = [read_fold(s) for s in sources]
    configs = [_fold_config(s) for s in sources]
    for source, config, fold in zip(sources, configs, folds, strict=True):
        _check_config(source, config, fold)
    first = folds[0]
    shapes = [tuple(w.shape) for w, _ in first]
    for s, fold in zip(sources, folds, strict=False):
        if [tuple(w.shape) for w, _ in fold] != shapes:
            raise ModelError(f"{s.label} has another architecture than {sources[0].label}; folds must match.")
    for key in ("ks", "dropout"):
        values = {str(c[key]) for c in configs if key in c}
        if len(values) > 1 and key not in explicit:
            raise ModelError(f"The folds' config.json files disagree on {key} ({', '.join(sorted(values))}).")
    in_dim = first[0][0].shape[1]
    n_out = first[-1][0].shape[0]
    if feature_dim is not None and int(feature_dim) != in_dim:
        raise ModelError(f"The checkpoint takes {in_dim} features per tile, not {feature_dim}.")
    if len(gene_names) != n_out:
        raise ModelError(
            f"The checkpoint predicts {n_out} outputs but {len(gene_names)} gene names were given"
            f"{gene_source}; the gene list must name every output, in order."
        )

    sequoia = [s.label for s in sources if s.config is not None and SEQUOIA_NAME.search(s.label)]
    if sequoia and preset is None and "aggregation" not in explicit:
        warnings.warn(
            f"{sequoia[0]} looks like one of SEQUOIA's HE2RNA re-trainings, trained on k-means cluster means "
            "of 256 px tiles at 20x: without --preset sequoia-he2rna its maps are not the ones they "
            "validated.",
            He2rnaWarning,
            stacklevel=2,
        )
    from_config = {k: v for c in configs for k, v in c.items() if k in ("ks", "dropout")}
    settings = {**_DEFAULTS, **PRESETS.get(preset or "", {}), **from_config, **explicit}
    if settings["aggregation"] == "kmeans" and settings["clustering"] is None:
        settings["clustering"] = Clustering()
    if settings["tile_um"] is None:
        px, mag = settings["tile_px"], settings["tile_magnification"]
        # nominal µm of a tile in px at a magnification (20x is about 0.5 µm/px); a slide's own is used on it
        settings["tile_um"] = px * UM_PER_PX_AT_1X / mag if px and mag else 112.0
    if not settings["input_resize"] and not settings["tile_px"]:
        raise ModelError(
            "Tiles fed without resizing need their size in pixels: give --tile-px and --magnification "
            "(e.g. 256 and 20) or --preset sequoia-he2rna."
        )

    hidden = [w.shape[0] for w, _ in first[:-1]]
    models = []
    for fold in folds:
        m = HE2RNA(in_dim, n_out, hidden, float(settings["dropout"]))
        with torch.no_grad():
            for layer, (w, b) in zip(m.layers, fold, strict=False):
                layer.weight.copy_(w[:, :, None])
                layer.bias.copy_(b)
        models.append(m)
    extra = dict(metadata or {})
    extra.setdefault("converted_from", [s.label for s in sources])
    extra.setdefault("output_unit", str(settings["unit"]))
    if preset is not None:
        extra.setdefault("preset", preset)
    return save_bundle(
        out,
        models,
        gene_names,
        settings["backbone"],
        in_dim,
        float(settings["tile_um"]),
        [int(k) for k in settings["ks"]],
        extra,
        demo,
        settings["aggregation"],
        tile_px=settings["tile_px"],
        tile_magnification=settings["tile_magnification"],
        input_resize=bool(settings["input_resize"]),
        clustering=settings["clustering"],
    )
