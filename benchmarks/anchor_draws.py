"""Issue 23: is HE2RNA held near the ridge tile map (``new-anchor-1``) better than the ensemble, over the
cohort-and-fold draws ``benchmarks/model_rules.py`` compares its rules on?

Per fold draw (``--fold-seeds``; the folds, the settings and the untrained null are ``model_rules.py``'s:
:data:`model_rules.CONFIG`, ``cv_folds(..., CONFIG.n_folds, fold_seed)``, ``null_predictions(cohort, CONFIG,
--null-inits)``) five rows are trained and scored on the same folds:

* ``ridge``: the linear baseline (``fit(cohort, "ridge", ...)``);
* ``HE2RNA``: the defaults (``fit(cohort, "he2rna", CONFIG, ...)``);
* ``ensemble (0.5)``: that HE2RNA and that ridge averaged per tile, linear share 0.5
  (:func:`napari_he2rna.model.fitting.ensemble_result`, what ``he2rna train`` does);
* ``anchor-1``: HE2RNA trained with ``1.0 x mean over valid tiles and genes of (tile score - the fold's ridge
  tile score)^2`` added to each batch's loss: ``fit(cohort, "he2rna", replace(CONFIG, anchor=1.0), ...)``,
  what ``he2rna train --model-type he2rna --anchor 1`` does (the results were first measured with a patched
  training loop, before the library had the option; the library gave identical counts on all 8 draws, its
  out-of-fold predictions within 0.011: the ``library`` check row of the JSON files);
* ``anchor-1 + ridge averaged (0.5)``: that anchored HE2RNA and the ridge averaged per tile, linear share 0.5
  (``ensemble_result`` again).

Counts: planted genes and controls called by Benjamini-Hochberg per cancer type on the fold-mean R (``fm``)
and on the pooled out-of-fold R (``pooled``), as ``model_rules.py`` counts them. Checks, in ``checks``:
``model_rules``' ``HE2RNA + ridge slide predictions averaged`` (its "ensemble (mean of both)", computed from
the same two fits) and, with ``--rules-json``, whether ridge, HE2RNA and that slide-level mean reproduce
``model_rules.py``'s counts for the same draws.

With ``--held``, on the draw ``--held-draw`` only, the unseen slides are scored by each row's fold ensemble
(``ablation_training.map_records`` / ``summarise_maps``, as ``ablation_rows23.py`` does).

    python benchmarks/anchor_draws.py --cohort /tmp/i23/c60 --features /tmp/i23/f60 --fold-seeds 0 1 2 \\
        --rules-json benchmarks/results/model_rules_c60.json --held /tmp/i23/held \\
        --held-features /tmp/i23/fheld --out benchmarks/results/anchor_draws_c60.json
    python benchmarks/anchor_draws.py --table benchmarks/results/anchor_draws_c40.json ...   # the tables
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ablation_training import (
    fold_models,
    load_cohort_features,
    map_records,
    planted_counts,
    summarise_maps,
)
from model_rules import CONFIG

from napari_he2rna.cohorts.cohort import load_samples
from napari_he2rna.model.fitting import ensemble_result, evaluate_result, fit, null_predictions
from napari_he2rna.model.folds import cv_folds

NAMES = ("ridge", "HE2RNA", "ensemble (0.5)", "anchor-1", "anchor-1 + ridge averaged (0.5)")
SLIDE_MEAN = "HE2RNA + ridge slide predictions averaged (model_rules' ensemble)"
#: our row -> model_rules.py's rule computed from the same fits
MODEL_RULES = {"ridge": "ridge", "HE2RNA": "HE2RNA", SLIDE_MEAN: "ensemble (mean of both)"}
LINEAR_SHARE = 0.5


def counts(cohort, oof: pd.DataFrame, folds: np.ndarray, null: np.ndarray) -> dict:
    ev = evaluate_result(cohort, oof, folds, null)
    return {
        "fm": planted_counts(ev.per_gene, "significant_bh"),
        "pooled": planted_counts(ev.per_gene, "significant_bh_pooled"),
    }


def train_draw(cohort, folds: np.ndarray) -> tuple[dict, dict, dict]:
    """(row -> CVResult, check row -> out-of-fold DataFrame, row -> training seconds) of one fold draw."""
    res, secs, extra = {}, {}, {}
    t = time.perf_counter()
    res["ridge"] = fit(cohort, "ridge", CONFIG, folds=folds)
    secs["ridge"] = time.perf_counter() - t
    t = time.perf_counter()
    res["HE2RNA"] = fit(cohort, "he2rna", CONFIG, folds=folds)
    secs["HE2RNA"] = time.perf_counter() - t
    t = time.perf_counter()
    res["ensemble (0.5)"] = ensemble_result(cohort, res["HE2RNA"], res["ridge"], linear_weight=LINEAR_SHARE)
    secs["ensemble (0.5)"] = time.perf_counter() - t  # the blend alone (both models are trained above)
    t = time.perf_counter()
    res["anchor-1"] = fit(cohort, "he2rna", replace(CONFIG, anchor=1.0), folds=folds)
    secs["anchor-1"] = time.perf_counter() - t
    t = time.perf_counter()
    res["anchor-1 + ridge averaged (0.5)"] = ensemble_result(
        cohort, res["anchor-1"], res["ridge"], linear_weight=LINEAR_SHARE
    )
    secs["anchor-1 + ridge averaged (0.5)"] = time.perf_counter() - t
    extra[SLIDE_MEAN] = 0.5 * (res["HE2RNA"].oof + res["ridge"].oof)
    return res, extra, secs


def compare_counts(ours: dict, theirs: dict) -> list[str]:
    """Where two ``{"fm"|"pooled": {type: counts}}`` differ, in words (empty: identical)."""
    out = []
    for r in ("fm", "pooled"):
        for t in sorted(set(ours[r]) | set(theirs.get(r, {}))):
            a, b = ours[r].get(t), theirs.get(r, {}).get(t)
            if a != b:
                out.append(f"{r} {t}: here {a}, model_rules {b}")
    return out


def unseen_maps(results: dict, held_dir: str, held_features: str) -> dict:
    hs = load_samples(Path(held_dir) / "samples.tsv")
    held = [
        (sid, str(hs.loc[sid, "slide"]), str(hs.loc[sid].get("immune_phenotype", "mixed")))
        for sid in hs.index
    ]
    out = {}
    for name, result in results.items():
        slides = [(sid, path, ph, fold_models(result)) for sid, path, ph in held]
        recs = map_records(list(result.genes), slides, "hed-stats", held_features)
        out[name] = summarise_maps(recs, "unseen ")
        out[name]["unseen per slide"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in recs]
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "unseen per slide"}), flush=True)
    return out


# ----------------------------------------------------------------------------------------------- tables


def _draws(paths: list[str]) -> list[tuple[str, str, dict]]:
    """(cohort name, fold seed, row -> counts) of every draw in the result files, in file order."""
    out = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        cohort = Path(d["cohort"]).name
        rows = {**d["rows"], **d["checks"].get("rows", {})}
        for fs in d["fold_seeds"]:
            out.append((cohort, str(fs), {n: r[str(fs)] for n, r in rows.items() if str(fs) in r}))
    return out


def _total(c: dict, what: str, key: str = "planted") -> int:
    return sum(v[key] for v in c[what].values())


def _matches(c: dict, ridge: dict) -> bool:
    return all(c[r][t]["planted"] >= ridge[r][t]["planted"] for r in ("fm", "pooled") for t in ridge[r])


def table(paths: list[str]) -> str:
    draws = _draws(paths)
    names = [n for n in draws[0][2] if all(n in d for _, _, d in draws)]
    lines = [
        f"Summed over {len(draws)} draws: " + ", ".join(f"{c} {fs}" for c, fs, _ in draws),
        "",
        "| row | planted genes vs ridge, fold-mean R (total) | planted genes vs ridge, pooled R (total) "
        "| controls called (all draws, fm + pooled) "
        "| draws matching or beating ridge in every type, both R |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        fm = sum(_total(d[n], "fm") for _, _, d in draws)
        po = sum(_total(d[n], "pooled") for _, _, d in draws)
        rfm = sum(_total(d["ridge"], "fm") for _, _, d in draws)
        rpo = sum(_total(d["ridge"], "pooled") for _, _, d in draws)
        ctl_fm = sum(_total(d[n], "fm", "controls") for _, _, d in draws)
        ctl_po = sum(_total(d[n], "pooled", "controls") for _, _, d in draws)
        wins = sum(_matches(d[n], d["ridge"]) for _, _, d in draws)
        lines.append(
            f"| {n} | {fm - rfm:+d} ({fm}) | {po - rpo:+d} ({po}) | {ctl_fm + ctl_po} ({ctl_fm} + {ctl_po}) "
            f"| {wins} of {len(draws)} |"
        )
    lines += [
        "",
        "Per draw: planted genes called per cancer type, fold-mean R · pooled R (controls called, fm + "
        "pooled); * = matches or beats ridge in every type on both R.",
        "",
        "| draw | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for c, fs, d in draws:
        types = list(d["ridge"]["fm"])
        cells = []
        for n in names:
            fm = "/".join(str(d[n]["fm"][t]["planted"]) for t in types)
            po = "/".join(str(d[n]["pooled"][t]["planted"]) for t in types)
            ctl = f"{_total(d[n], 'fm', 'controls')}+{_total(d[n], 'pooled', 'controls')}"
            star = " *" if n != "ridge" and _matches(d[n], d["ridge"]) else ""
            cells.append(f"{fm} · {po} ({ctl}){star}")
        short = "/".join(t.replace("SYN-", "") for t in types)
        lines.append(f"| {c} {fs} ({short}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only print the tables of these result files")
    ap.add_argument("--cohort")
    ap.add_argument("--features")
    ap.add_argument("--fold-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--null-inits", type=int, default=10)
    ap.add_argument("--rules-json", help="model_rules.py's result for this cohort: is it reproduced?")
    ap.add_argument("--held", help="unseen slides (he2rna make-sample), scored on --held-draw only")
    ap.add_argument("--held-features", help="their feature cache (he2rna extract --backbone hed-stats)")
    ap.add_argument("--held-draw", type=int, default=0, help="the fold seed whose models score --held")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if not (args.cohort and args.features and args.out):
        ap.error("--cohort, --features and --out are needed (or --table)")
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    _, cohort = load_cohort_features(args.cohort, args.features)
    null = null_predictions(cohort, CONFIG, args.null_inits)
    theirs = json.loads(Path(args.rules_json).read_text())["rules"] if args.rules_json else None
    rows: dict[str, dict] = {n: {} for n in NAMES}
    check_rows: dict[str, dict] = {}
    reproduced: dict[str, dict] = {}
    seconds: dict[str, dict] = {}
    diffs: dict[str, dict] = {}
    maps = None
    for fs in args.fold_seeds:
        folds = cv_folds(cohort.samples.loc[cohort.sample_ids], CONFIG.n_folds, fs)
        results, extra, secs = train_draw(cohort, folds)
        for n, s in secs.items():
            seconds.setdefault(n, {})[str(fs)] = round(s, 1)
        for n, r in results.items():
            rows[n][str(fs)] = counts(cohort, r.oof, folds, null)
            print(fs, n, json.dumps(rows[n][str(fs)]), flush=True)
        for n, oof in extra.items():
            check_rows.setdefault(n, {})[str(fs)] = counts(cohort, oof, folds, null)
            print(fs, n, json.dumps(check_rows[n][str(fs)]), flush=True)
        d = diffs.setdefault(str(fs), {})
        d["max |ensemble (0.5) oof - slide-level mean oof|"] = float(
            np.abs(results["ensemble (0.5)"].oof - extra[SLIDE_MEAN]).to_numpy().max()
        )
        print(fs, json.dumps(d), flush=True)
        if theirs is not None:
            for ours, rule in MODEL_RULES.items():
                c = rows[ours][str(fs)] if ours in rows else check_rows[ours][str(fs)]
                if str(fs) in theirs.get(rule, {}):
                    reproduced.setdefault(ours, {})[str(fs)] = compare_counts(c, theirs[rule][str(fs)])
            same = {k: v.get(str(fs)) for k, v in reproduced.items()}
            print(fs, "differences to model_rules:", json.dumps(same), flush=True)
        if args.held and fs == args.held_draw:
            maps = unseen_maps(results, args.held, args.held_features)
    out = {
        "cohort": str(args.cohort),
        "features": str(args.features),
        "n_samples": len(cohort.sample_ids),
        "fold_seeds": args.fold_seeds,
        "null_inits": args.null_inits,
        "config": CONFIG.fingerprint(),
        "linear_share": LINEAR_SHARE,
        "rows": rows,
        "train_seconds": seconds,
        "checks": {
            "rows": check_rows,
            "oof differences": diffs,
            "model_rules file": args.rules_json,
            "differences to model_rules (empty list: identical counts)": reproduced,
        },
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    if maps is not None:
        out["unseen maps"] = {"held": args.held, "fold seed": args.held_draw, "rows": maps}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({out['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
