"""SLIDE-EX's outer fold models as ordinary model bundles (padded to one width, standardisation folded in)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..model.bundle import save_bundle
from ..model.evaluation import Evaluation
from ..model.network import HE2RNA
from ..model.scaling import FeatureScaler
from .nested_cv import NestedCVResult

# ------------------------------------------------------------------------------------------ bundles


def pad_hidden(model: HE2RNA, hidden: Sequence[int]) -> HE2RNA:
    """The same function with wider hidden layers: extra units get zero weights in and out (and bias 0)."""
    out = HE2RNA(model.input_dim, model.n_genes, hidden, model.dropout_p)
    with torch.no_grad():
        for src, dst in zip(model.layers, out.layers, strict=True):
            dst.weight.zero_()
            dst.bias.zero_()
            o, i, _ = src.weight.shape
            dst.weight[:o, :i] = src.weight
            dst.bias[:o] = src.bias
    return out


def bundle_models(result: NestedCVResult) -> list[HE2RNA]:
    """The outer fold models, padded to one architecture and taking raw (unstandardised) features."""
    hidden = result.config.hidden(max(o.width for o in result.outer))
    out = []
    for model, o in zip(result.models, result.outer, strict=True):
        m = pad_hidden(model, hidden)
        FeatureScaler(o.feature_mean, o.feature_std).fold_into(m)
        out.append(m.eval())
    return out


def save_result_bundle(
    path: str | Path,
    result: NestedCVResult,
    backbone: str,
    tile_um: float,
    samples: pd.DataFrame,
    evaluation: Evaluation | dict | None = None,
    extra: Mapping[str, Any] | None = None,
    demo: bool = False,
) -> Path:
    """Write the outer fold models of a nested CV as one model bundle (genes = ``result.names``).

    Metadata: ``folds`` (outer fold per sample, so
    :func:`napari_he2rna.model.cohort_prediction.bundle_oof_predictions`
    gives back the outer test predictions), ``validation_r`` (outer-test R per cancer type, regression),
    ``cohort`` and ``slide_ex`` (task, grid, the choice of every outer fold, evaluation summary).
    """
    models = bundle_models(result)
    sheet = samples.loc[result.sample_ids]
    counts = sheet["cancer_type"].astype(str).value_counts().sort_index()
    cfg = result.config
    info: dict[str, Any] = {
        "task": result.task,
        "outer_folds": len(result.outer),
        "inner_folds": cfg.inner_folds,
        "grid": {"widths": list(cfg.widths), "layers": cfg.layers, "epochs": list(cfg.epochs)},
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "choices": result.choices(),
        "note": (
            "outer fold models (nested CV); narrower folds zero-padded to the widest; the standardisation of "
            "each fold (outer training samples) is folded into its first layer: the bundle takes raw features"
        ),
    }
    meta: dict[str, Any] = {
        "cohort": {
            "n_samples": int(len(sheet)),
            "n_patients": int(sheet["patient_id"].nunique()),
            "n_genes": len(result.names),
            "cancer_types": {str(k): int(v) for k, v in counts.items()},
        },
        "folds": {s: int(f) for s, f in zip(result.sample_ids, result.folds, strict=True)},
        "slide_ex": info,
    }
    if isinstance(evaluation, Evaluation):
        wide = evaluation.per_gene.pivot(index="cancer_type", columns="gene", values="r")
        meta["validation_r"] = {
            str(t): {str(g): (None if not np.isfinite(v) else round(float(v), 4)) for g, v in row.items()}
            for t, row in wide.iterrows()
        }
        info["summary"] = json.loads(evaluation.summary.to_json(orient="records"))
        if "significant" in evaluation.per_gene:
            sig = evaluation.per_gene[evaluation.per_gene["significant"].astype(bool)]
            info["significant_holm_sidak"] = {
                str(t): sorted(sub["gene"].astype(str)) for t, sub in sig.groupby("cancer_type")
            }
    elif isinstance(evaluation, dict):
        info["evaluation"] = evaluation
    meta.update(extra or {})
    dim = models[0].input_dim
    return save_bundle(path, models, result.names, backbone, dim, tile_um, cfg.ks, meta, demo=demo)
