"""Files of the transfer commands: the representation model (one ``.safetensors`` file), slide-level feature
and representation tables, and the slide mean features read from the feature cache."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError, ModelError, unreadable_as
from ..jobs import CancelToken, ProgressCallback, check_cancel
from ..model.bundle import json_default
from ..safe_output import atomic_write, atomic_write_text, prepare_folder
from .networks import SimpleHE2RNA

REPRESENTATION_FORMAT = "napari-he2rna-representation"


# ----------------------------------------------------------------------------- representation files


def save_representation_model(
    path: str | Path,
    models: Sequence[SimpleHE2RNA],
    genes: Sequence[str],
    backbone: str,
    tile_um: float = 112.0,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the fold models of a simple HE2RNA as one ``.safetensors`` file (weights + JSON header).

    safetensors holds only tensors and strings: loading it runs no code (unlike a pickle).
    """
    from safetensors.torch import save

    from ..model.bundle import atomic_write_bytes

    models = list(models)
    if not models:
        raise ModelError("Cannot save a representation model without any model.")
    shapes = {(m.input_dim, m.n_genes, m.hidden) for m in models}
    if len(shapes) != 1:
        raise ModelError("The fold models of a representation model must have the same sizes.")
    if len(genes) != models[0].n_genes:
        raise ModelError(f"{len(genes)} gene names were given for {models[0].n_genes} model outputs.")
    tensors = {
        f"fold{i}.{k}": v.detach().cpu().float().contiguous().clone()
        for i, m in enumerate(models)
        for k, v in m.state_dict().items()
    }
    doc = {
        "input_dim": models[0].input_dim,
        "hidden": list(models[0].hidden),
        "genes": [str(g) for g in genes],
        "backbone": str(backbone),
        "tile_um": float(tile_um),
        "n_folds": len(models),
        "extra": dict(metadata or {}),
    }
    header = {"format": REPRESENTATION_FORMAT, "doc": json.dumps(doc, default=json_default)}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=header))
    return path


def load_representation_model(path: str | Path) -> tuple[list[SimpleHE2RNA], dict[str, Any]]:
    """Read :func:`save_representation_model`'s file: the fold models (eval mode, CPU) and the JSON document
    (``input_dim``, ``hidden``, ``genes``, ``backbone``, ``tile_um``, ``n_folds``, ``extra``).

    Raises
    ------
    ModelError
        Missing, not a representation model, corrupt, or tensors that do not fit the declared sizes.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Representation model {path} does not exist.")
    with unreadable_as(ModelError, f"{path.name} cannot be read as a representation model"):
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            if header.get("format") != REPRESENTATION_FORMAT:
                raise ModelError(f"{path.name} is not a representation model (made by `he2rna represent`).")
            doc = json.loads(header["doc"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        models = []
        for i in range(int(doc["n_folds"])):
            m = SimpleHE2RNA(int(doc["input_dim"]), len(doc["genes"]), [int(h) for h in doc["hidden"]])
            prefix = f"fold{i}."
            m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            models.append(m.eval())
    if not models:
        raise ModelError(f"{path.name} holds no fold model.")
    return models, doc


def read_feature_table(path: str | Path) -> pd.DataFrame:
    """Slide-level features keyed by sample: CSV/TSV (first column the sample id) or ``.npz`` (either
    ``sample_id`` + one 2-D array, or one 1-D array per sample id). Returns samples x features (float32)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Feature table {path} does not exist.")
    with unreadable_as(DataError, f"Feature table {path.name} cannot be read"):
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if "sample_id" in keys:
                    arrays = [k for k in keys if k != "sample_id" and z[k].ndim == 2]
                    if len(arrays) != 1:
                        raise DataError(f"{path.name} must hold sample_id and one (n, dim) array.")
                    df = pd.DataFrame(z[arrays[0]], index=z["sample_id"].astype(str))
                else:
                    df = pd.DataFrame({k: np.asarray(z[k]).reshape(-1) for k in keys}).T
        else:
            from ..cohorts.cohort import read_table

            tab = read_table(path)
            df = tab.set_index(tab.columns[0])
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise DataError(f"Feature table {path.name} has no samples or no features.")
    df.index = df.index.astype(str)
    if df.index.duplicated().any():
        raise DataError(
            f"{path.name} lists samples more than once (e.g. {df.index[df.index.duplicated()][0]})."
        )
    df.index.name = "sample_id"
    df.columns = [str(c) for c in df.columns]
    try:
        out = df.astype(np.float32)
    except (ValueError, TypeError):
        raise DataError(
            f"{path.name} has non-numeric feature columns; the first column must be the sample id."
        ) from None
    if not np.isfinite(out.to_numpy()).all():
        raise DataError(f"{path.name} holds missing or infinite feature values.")
    return out


def representation_frame(rep: np.ndarray, sample_ids: Sequence[str]) -> pd.DataFrame:
    """A representation as a DataFrame: index ``sample_id``, columns ``rep_000`` ..."""
    rep = np.asarray(rep, dtype=np.float32)
    width = max(3, len(str(rep.shape[1] - 1)))
    df = pd.DataFrame(rep, index=pd.Index([str(s) for s in sample_ids], name="sample_id"))
    df.columns = [f"rep_{i:0{width}d}" for i in range(rep.shape[1])]
    return df


def write_representation(rep: pd.DataFrame, path: str | Path) -> Path:
    """Write a representation (samples x units, index = sample ids) as TSV, CSV (by suffix) or ``.npz``
    (``sample_id`` + ``representation``); :func:`read_feature_table` reads each back."""
    path = Path(path)
    prepare_folder(path.parent)
    rep = rep.copy()
    rep.index = rep.index.astype(str)
    rep.index.name = "sample_id"
    name = path.name.lower()
    if name.endswith(".npz"):
        ids, values = rep.index.to_numpy().astype(str), rep.to_numpy(np.float32)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would add .npz to a name
                np.savez(fh, sample_id=ids, representation=values)

        atomic_write(path, write)
    elif name.endswith(".tsv") or name.endswith(".csv") or name.endswith(".txt"):
        sep = "," if name.endswith(".csv") else "\t"
        atomic_write_text(path, rep.to_csv(sep=sep, lineterminator="\n", float_format="%.7g"))
    else:
        raise DataError(f"Cannot write a representation as {path.name}: use .tsv, .csv or .npz.")
    return path


@dataclass
class SlideFeatures:
    """Per sample: the mean tile feature (a row of ``mean``), the supertile features (when asked for), and
    the samples without features (sample -> reason)."""

    mean: pd.DataFrame  # samples x dim
    supertiles: dict[str, np.ndarray]  # sample -> (k, dim); empty unless with_supertiles
    failed: dict[str, str]


def load_slide_features(
    samples: pd.DataFrame,
    backbone: str,
    tile_um: float = 112.0,
    cache_dir: str | Path | None = None,
    supertile_k: int = 100,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    with_supertiles: bool = False,
) -> SlideFeatures:
    """Mean tile feature (over *all* tiles, the simple HE2RNA's input) of every sample of a sheet (``slide``
    column), read the way ``he2rna train`` reads a cohort:
    :func:`napari_he2rna.cohorts.cohort.cohort_features`
    on the shared feature cache (extracted when missing).

    The supertile means are not used for the mean: supertiles are unweighted cluster centroids. Each slide's
    tiles are read once: the mean is taken while they are loaded
    (:meth:`napari_he2rna.cohorts.cohort.LazyFeatures.tile_mean`).
    """
    from ..cohorts.cohort import cohort_features

    feats, failed = cohort_features(
        samples, backbone, tile_um, cache_dir, supertiles=with_supertiles, supertile_k=supertile_k,
        device=device, progress=progress, cancel=cancel,
    )  # fmt: skip
    means: dict[str, np.ndarray] = {}
    for sid in feats:
        check_cancel(cancel)
        means[sid] = feats.tile_mean(sid)
    mean = pd.DataFrame.from_dict(means, orient="index").astype(np.float32)
    mean.index = mean.index.astype(str)
    mean.index.name = "sample_id"
    mean.columns = [str(c) for c in mean.columns]
    sts = {sid: np.asarray(feats[sid], np.float32) for sid in feats} if with_supertiles else {}
    return SlideFeatures(mean, sts, failed)
