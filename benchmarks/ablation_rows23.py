"""Issue 23: the candidate rows for HE2RNA alone not measured before, beside the reference rows.

Every row is scored exactly as ``benchmarks/ablation_training.py`` scores a variant (same patient-grouped
folds, same untrained null, same significance counts and out-of-fold / unseen tile maps) and goes through the
library's :func:`napari_he2rna.model.fitting.fit` (so :func:`~napari_he2rna.model.training.cross_validate`:
folds, per-fold input scalers, output rescaling, out-of-fold prediction). Each ``new-`` row is HE2RNA alone on
top of the current defaults (``BASE`` with ``ks=(50, 100)``, ``val_fraction=0``):

* ``new-hidden-64x2``: ``TrainConfig(hidden=(64, 64))``, nothing else changed.
* ``new-val-0.2``: ``TrainConfig(val_fraction=0.2)`` (early stopping on the inner validation split, at most
  200 epochs, patience 50: the config's defaults).
* The rows below change the training loop itself. :func:`variant_train_one` is a copy of the structure of
  :func:`napari_he2rna.model.training.train_one` (same batches, same k draws, same random generators, same
  validation and best-epoch logic) with the variant's change; for that row only it is patched in as
  ``napari_he2rna.model.training.train_one`` (which ``cross_validate`` calls) and the library's function is
  restored afterwards. With no change (``--variants new-loop-identity``) it reproduces the library's
  predictions (checked: the script prints the largest difference).

  - ``new-input-dropout-0.2``: ``torch.nn.functional.dropout(x, 0.2)`` on each training batch's input, i.e.
    on the standardised features of every tile (inverted dropout: kept features scaled by 1/0.8; padded
    tiles stay 0); nothing at validation or prediction.
  - ``new-cosine``: ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=max_epochs, eta_min=0)``, stepped once
    per epoch (the learning rate falls from 3e-4 to 0 over the 200 epochs).
  - ``new-bias-0``: the output layer's bias set to 0 before training (the library starts it at the mean
    training target); the model's weights are drawn as before (same seed).

* ``new-anchor-1``, ``new-anchor-0.1``: ``TrainConfig(anchor=1.0 / 0.1)`` (``he2rna train --anchor``): the
  ridge baseline is fitted first on the same folds and ``lambda * mean over real tiles and genes of (HE2RNA
  tile score - ridge tile score)^2``, in the units the fold trains in, is added to each batch's MSE
  (:func:`napari_he2rna.model.training.train_one`). The first results were measured with a patched loop of
  this file, before the library had the option; the library gives identical counts on all 8 draws of
  ``anchor_draws.py`` (out-of-fold predictions within 0.011).

Reference rows, in the same run: ``ridge``, ``k-50-100-no-validation`` (HE2RNA with the defaults),
``ensemble`` (HE2RNA + ridge averaged per tile, linear share 0.5) and ``ensemble-anchor-1`` (the same with
HE2RNA trained with ``--anchor 1``).

    python benchmarks/ablation_rows23.py --cohort /tmp/i23/c60 --features /tmp/i23/f60 \
        --held /tmp/i23/held --held-features /tmp/i23/fheld --null-inits 10 \
        --out benchmarks/results/ablation23_rows_c60.json

The JSON has ``ablation_training.py``'s layout (``cohort``, ``n_samples``, ``variants``: one row per name);
each row also has ``fit_seconds`` (training alone) and ``how`` (the variant, in words).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ablation_training
import numpy as np
import torch
from ablation_training import BASE, VARIANTS, load_cohort_features, score_variant

import napari_he2rna.model.training as training_mod
from napari_he2rna.cohorts.cohort import load_samples
from napari_he2rna.jobs import check_cancel
from napari_he2rna.model.cohort_prediction import predict_slides
from napari_he2rna.model.fitting import fit, null_predictions
from napari_he2rna.model.folds import choose_criterion, cv_folds
from napari_he2rna.model.network import topk_mean
from napari_he2rna.model.prefetch import iter_batches
from napari_he2rna.model.training import CVResult, TrainConfig, validation_score

#: The current defaults every ``new-`` row starts from (as ``VARIANTS["k-50-100-no-validation"]``).
DEFAULTS: dict[str, Any] = {"ks": (50, 100), "val_fraction": 0.0}


@dataclass(frozen=True)
class LoopChange:
    """What :func:`variant_train_one` changes in the library's training loop (nothing by default)."""

    input_dropout: float = 0.0
    cosine: bool = False
    zero_bias: bool = False


#: name -> (TrainConfig changes on top of DEFAULTS, loop change or None for the library's loop, in words)
ROWS: dict[str, tuple[dict[str, Any], LoopChange | None, str]] = {
    "new-input-dropout-0.2": ({}, LoopChange(input_dropout=0.2), "dropout 0.2 on the standardised inputs"),
    "new-hidden-64x2": ({"hidden": (64, 64)}, None, "hidden (64, 64)"),
    "new-val-0.2": ({"val_fraction": 0.2}, None, "early stopping on a 20 % validation split"),
    "new-cosine": ({}, LoopChange(cosine=True), "cosine annealing of the learning rate to 0"),
    "new-bias-0": ({}, LoopChange(zero_bias=True), "output bias initialised at 0"),
    "new-anchor-1": ({"anchor": 1.0}, None, "+ 1 x mean (tile score - ridge tile score)^2 (--anchor 1)"),
    "new-anchor-0.1": ({"anchor": 0.1}, None, "+ 0.1 x mean (tile score - ridge tile score)^2"),
    "new-loop-identity": ({}, LoopChange(), "the copied loop, unchanged (a check, not a candidate)"),
}
REFERENCE = ("ridge", "k-50-100-no-validation", "ensemble", "ensemble-anchor-1")
DEFAULT_ROWS = [*REFERENCE, *(n for n in ROWS if n != "new-loop-identity")]


def variant_train_one(
    model,
    slides,
    y,
    types,
    train_idx,
    val_idx,
    config: TrainConfig,
    device,
    rng,
    on_epoch: Callable | None = None,
    cancel=None,
    aggregation: str = "topk",
    anchor_model=None,  # the library's anchor (TrainConfig.anchor): 0 in the rows that use this loop
    *,
    change: LoopChange,
) -> dict[str, Any]:
    """:func:`napari_he2rna.model.training.train_one`'s loop with ``change`` applied (same arguments)."""
    ks = config.k_list
    criterion = choose_criterion(types[val_idx], types[train_idx])
    if change.zero_bias:
        with torch.no_grad():
            model.layers[-1].bias.zero_()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.max_epochs, eta_min=0.0)
        if change.cosine
        else None
    )
    y_t = torch.from_numpy(np.array(y, dtype=np.float32))
    best_score, best_epoch, best_state = -np.inf, -1, None
    scores: list[float] = []
    losses: list[float] = []
    for epoch in range(config.max_epochs):
        check_cancel(cancel)
        model.train()
        order = rng.permutation(train_idx)
        total, count = 0.0, 0
        batches = [order[start : start + config.batch] for start in range(0, len(order), config.batch)]
        with closing(iter_batches(slides, batches, device)) as stream:
            for batch, (x, mask) in zip(batches, stream, strict=True):
                if change.input_dropout > 0:
                    x = torch.nn.functional.dropout(x, p=change.input_dropout, training=True)
                scores_t = model(x, mask)
                if aggregation == "mean":
                    m = mask[:, None, :].to(scores_t.dtype)
                    pred = (scores_t * m).sum(2) / m.sum(2).clamp_min(1)
                else:
                    k = int(rng.choice(ks))
                    pred = topk_mean(scores_t, mask, k)
                loss = torch.nn.functional.mse_loss(pred, y_t[batch].to(device))
                fit_loss = float(loss.detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += fit_loss * len(batch)  # the slide-level MSE alone, as the library logs it
                count += len(batch)
                check_cancel(cancel)
        if sched is not None:
            sched.step()
        losses.append(total / max(count, 1))
        if criterion != "none":
            pv = predict_slides(model, slides, val_idx, ks, device, config.batch, aggregation)
            score = validation_score(criterion, y[val_idx], pv, types[val_idx])
        else:
            score = float("nan")
        scores.append(score)
        if criterion == "none" or (np.isfinite(score) and score > best_score):
            best_score = score if np.isfinite(score) else best_score
            best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(epoch, {"criterion": criterion, "score": score, "train_loss": losses[-1]})
        if criterion != "none" and best_epoch >= 0 and epoch - best_epoch >= config.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    history = {
        "criterion": criterion,
        "epochs_run": len(scores),
        "best_epoch": best_epoch,
        "best_score": None if not np.isfinite(best_score) else float(best_score),
        "val_scores": [None if not np.isfinite(s) else round(float(s), 5) for s in scores],
        "train_loss": [round(float(v), 6) for v in losses],
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
    }
    return history


def fit_with_loop(cohort, config: TrainConfig, folds, change: LoopChange) -> CVResult:
    """``fit(cohort, "he2rna", config, folds=folds)`` with :func:`variant_train_one` as the training loop."""

    def loop(*args, **kwargs):
        return variant_train_one(*args, change=change, **kwargs)

    library_loop = training_mod.train_one
    training_mod.train_one = loop
    try:
        return fit(cohort, "he2rna", config, folds=folds)
    finally:
        training_mod.train_one = library_loop


def train_row(name: str, cohort, base: TrainConfig, folds) -> tuple[CVResult, str]:
    if name == "ridge":
        return fit(cohort, "ridge", base, folds=folds), "ridge baseline"
    if name == "ensemble":
        cfg = replace(base, **VARIANTS["ensemble"])
        result = fit(cohort, "ensemble", cfg, folds=folds, linear_weight=0.5)
        return result, "HE2RNA + ridge, linear share 0.5"
    if name == "ensemble-anchor-1":
        cfg = replace(base, **VARIANTS["ensemble"], anchor=1.0)
        result = fit(cohort, "ensemble", cfg, folds=folds, linear_weight=0.5)
        return result, "HE2RNA held near ridge's map (--anchor 1) + ridge, linear share 0.5"
    if name in VARIANTS:
        return fit(cohort, "he2rna", replace(base, **VARIANTS[name]), folds=folds), "HE2RNA, defaults"
    changes, loop, how = ROWS[name]
    cfg = replace(base, **{**DEFAULTS, **changes})
    if loop is None:
        return fit(cohort, "he2rna", cfg, folds=folds), how
    return fit_with_loop(cohort, cfg, folds, loop), how


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_ROWS)
    ap.add_argument("--null-inits", type=int, default=10)
    ap.add_argument("--held", help="unseen slides (he2rna make-sample), scored by the fold ensemble")
    ap.add_argument("--held-features", help="its feature cache (he2rna extract --backbone hed-stats)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.variants if n not in ROWS and n not in REFERENCE and n not in VARIANTS]
    if unknown:
        ap.error(f"unknown rows: {unknown}")
    torch.set_num_threads(1)
    samples, cohort = load_cohort_features(args.cohort, args.features)
    base = BASE
    folds = cv_folds(cohort.samples.loc[cohort.sample_ids], base.n_folds, base.seed)
    null = null_predictions(cohort, base, args.null_inits)
    held = None
    if args.held:
        hs = load_samples(Path(args.held) / "samples.tsv")
        ablation_training.HELD_CACHE[0] = args.held_features  # what ensemble_spread reads
        held = [
            (sid, str(hs.loc[sid, "slide"]), str(hs.loc[sid].get("immune_phenotype", "mixed")))
            for sid in hs.index
        ]
    results: dict[str, dict] = {}
    reference_oof = None
    for name in args.variants:
        t0 = time.perf_counter()
        result, how = train_row(name, cohort, base, folds)
        fit_s = time.perf_counter() - t0
        row = score_variant(result, cohort, samples, folds, null, args, held, t0)
        if name == "new-loop-identity":  # the copied loop against the library's, same settings
            if reference_oof is None:
                reference_oof = fit(cohort, "he2rna", replace(base, **DEFAULTS), folds=folds).oof
            row["max |oof - library oof|"] = float(np.abs(result.oof - reference_oof).to_numpy().max())
        elif name == "k-50-100-no-validation":
            reference_oof = result.oof
        row = {"seconds": row.pop("seconds"), "fit_seconds": round(fit_s, 1), "how": how, **row}
        results[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "unseen per slide"}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"cohort": str(args.cohort), "n_samples": len(cohort.sample_ids), "variants": results}, indent=1
        )
    )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
