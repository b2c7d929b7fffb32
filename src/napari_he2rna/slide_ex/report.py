"""Writing a SLIDE-EX run: the bundles, the tables, ``slide_ex.json`` and ``report.md``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from ..model.bundle import json_default
from ..safe_output import atomic_write_text, staged_folder
from .bundles import save_result_bundle
from .experiment import SlideExResult
from .nested_cv import NestedCVConfig
from .targets import RESPONDER

# ------------------------------------------------------------------------------------------ writing


def _safe_stem(name: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return stem or "target"


def _write_csv(path: Path, df: pd.DataFrame, index: bool = False) -> None:
    atomic_write_text(path, df.to_csv(index=index, lineterminator="\n"))


def write_slide_ex(
    result: SlideExResult,
    out_dir: str | Path,
    backbone: str,
    tile_um: float = 112.0,
    demo: bool = False,
) -> dict[str, Path]:
    """Write the bundles and tables of a SLIDE-EX run into ``out_dir``.

    Files: ``models/<cell type>.safetensors`` (outputs ``"<cell type> <gene>"``),
    ``models/abundance.safetensors`` (``"<cell type> abundance"``), ``models/responder.safetensors``
    (``"responder"``), ``summary.csv``, ``per_gene.csv``, ``predictions.csv`` (outer test predictions),
    ``outer_folds.csv``,
    ``inner_scores.csv`` (the hyper-parameter grid scored in every outer fold), ``slide_ex.json`` and
    ``report.md``.
    """
    out = Path(out_dir)
    with staged_folder(out, overwrite=True) as stage:  # every file is moved into out_dir together at the end
        staged = _write_into(stage, result, backbone, tile_um, demo)
    return {key: out / p.relative_to(stage) for key, p in staged.items()}


def _write_into(
    out: Path, result: SlideExResult, backbone: str, tile_um: float, demo: bool
) -> dict[str, Path]:
    """The files of :func:`write_slide_ex` in ``out`` (its staging folder); returns name -> path."""
    paths: dict[str, Path] = {}
    extra = {"slide_ex_outputs": "see slide_ex.json next to the models folder"}
    for target, res in result.regressions().items():
        p = out / "models" / f"{_safe_stem(target)}.safetensors"
        paths[f"model:{target}"] = save_result_bundle(
            p, res, backbone, tile_um, result.samples, result.evaluations.get(target), extra, demo
        )
    if result.responder is not None:
        paths[f"model:{RESPONDER}"] = save_result_bundle(
            out / "models" / f"{RESPONDER}.safetensors",
            result.responder,
            backbone,
            tile_um,
            result.samples,
            result.responder_evaluation,
            extra,
            demo,
        )

    summary, per_gene = result.summary(), result.per_gene()
    paths["summary"], paths["per_gene"] = out / "summary.csv", out / "per_gene.csv"
    _write_csv(paths["summary"], summary)
    _write_csv(paths["per_gene"], per_gene)
    folds = result.samples[["patient_id", "cancer_type"]].assign(fold=result.folds).rename_axis("sample_id")
    paths["outer_folds"] = out / "outer_folds.csv"
    _write_csv(paths["outer_folds"], folds, index=True)
    preds, inner = [], []
    every = dict(result.regressions())
    if result.responder is not None:
        every[RESPONDER] = result.responder
    for target, res in every.items():
        long = (
            res.oof.rename_axis("sample_id")
            .reset_index()
            .melt(id_vars="sample_id", var_name="name", value_name="predicted")
        )
        long.insert(0, "target", target)
        long["outer_fold"] = long["sample_id"].map(dict(zip(res.sample_ids, res.folds, strict=True)))
        preds.append(long)
        for o in res.outer:
            tab = o.inner_scores.copy()
            tab.insert(0, "target", target)
            tab.insert(1, "outer_fold", o.fold)
            tab["chosen"] = (tab["width"] == o.width) & (tab["epochs"] == o.epochs)
            inner.append(tab)
    paths["predictions"], paths["inner_scores"] = out / "predictions.csv", out / "inner_scores.csv"
    _write_csv(paths["predictions"], pd.concat(preds, ignore_index=True))
    _write_csv(paths["inner_scores"], pd.concat(inner, ignore_index=True))

    cfg = result.config or NestedCVConfig()
    doc = {
        "config": asdict(cfg),
        "backbone": backbone,
        "tile_um": tile_um,
        "n_samples": int(len(result.samples)),
        "n_patients": int(result.samples["patient_id"].nunique()),
        "summary": json.loads(summary.to_json(orient="records")) if not summary.empty else [],
        "choices": {t: r.choices() for t, r in every.items()},
        "responder": result.responder_evaluation,
        "notes": result.notes,
        "models": {
            k.split(":", 1)[1]: str(v.relative_to(out)) for k, v in paths.items() if k.startswith("model:")
        },
    }
    paths["json"] = out / "slide_ex.json"
    atomic_write_text(paths["json"], json.dumps(doc, indent=2, default=json_default))
    paths["report"] = out / "report.md"
    atomic_write_text(paths["report"], _report(result, summary, per_gene, doc))
    return paths


def _report(result: SlideExResult, summary: pd.DataFrame, per_gene: pd.DataFrame, doc: dict) -> str:
    from ..model.evaluation import md_table

    cfg = result.config or NestedCVConfig()
    lines = [
        "# SLIDE-EX: cell-type-specific expression and abundance from slide features",
        "",
        f"{doc['n_samples']} samples of {doc['n_patients']} patients; nested cross-validation with "
        f"{cfg.outer_folds} outer and {cfg.inner_folds} inner patient-grouped folds; inner grid: widths "
        f"{list(cfg.widths)} x {cfg.layers} layers, epochs {list(cfg.epochs)}.",
        "Pearson R between outer-test predictions and the deconvolved targets, per cancer type, within "
        "each outer fold and averaged over folds; significance: one-sided empirical p against the same "
        f"architecture untrained ({cfg.null_inits} inits), Holm–Šidák per cell type and cancer type, "
        f"alpha = {cfg.alpha}.",
        "",
        "## Summary",
        "",
        md_table(summary) if not summary.empty else "(no regression target)",
        "",
    ]
    if not per_gene.empty:
        cols = [
            c
            for c in ("target", "cancer_type", "name", "r", "p_empirical", "p_holm_sidak", "significant")
            if c in per_gene
        ]
        lines += ["## Per gene", "", md_table(per_gene[cols]), ""]
    if result.responder_evaluation:
        ev = result.responder_evaluation
        lines += [
            "## Direct responder classifier (baseline)",
            "",
            f"Patient-level ROC AUC on the outer test folds: {ev['auc_patients']} "
            f"(one-sided Mann–Whitney p = {ev['p_mann_whitney']}; {ev['n_patients']} patients, "
            f"{ev['n_responder_patients']} responders); "
            f"per outer fold: {ev['auc_per_outer_fold']}; per cancer type: {ev['auc_per_cancer_type']}.",
            "",
        ]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    lines += [
        "Files: summary.csv, per_gene.csv, predictions.csv, outer_folds.csv, inner_scores.csv, "
        "slide_ex.json, models/*.safetensors.",
        "",
    ]
    return "\n".join(lines)
