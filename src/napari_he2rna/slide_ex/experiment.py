"""A SLIDE-EX run: nested CV per cell type, for the abundances and for the responder classifier, and the
evaluation of its outer-test predictions (untrained null, Holm–Šidák / BH, patient-level AUC)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..cohorts.cohort import Cohort
from ..errors import DataError
from ..jobs import CancelToken, ProgressCallback, report
from ..model.evaluation import Evaluation, evaluate
from ..model.folds import patient_auc
from ..model.scaling import FeatureScaler, ScaledFeatures
from ..model.training import (
    untrained_predictions,
)
from .nested_cv import NestedCVConfig, NestedCVResult, nested_cross_validate, outer_folds
from .targets import ABUNDANCE, RESPONDER, DeconvolvedTargets, abundance_name, target_name

# ------------------------------------------------------------------------------------------ evaluation


def untrained_null(
    result: NestedCVResult, features: Mapping[str, np.ndarray], samples: pd.DataFrame, seed: int = 12345
) -> np.ndarray:
    """Predictions of each outer fold's architecture, untrained, on that fold's test samples.

    Returns
    -------
    np.ndarray
        ``(null_inits, n_samples, n_outputs)``, the null of :func:`napari_he2rna.model.evaluation.evaluate`.
    """
    cfg = result.config
    pos = {s: i for i, s in enumerate(result.sample_ids)}
    out = np.full((cfg.null_inits, len(pos), len(result.names)), np.nan, dtype=np.float32)
    for o in result.outer:
        test = o.test_ids
        cohort = Cohort(
            expression=result.oof.loc[test],  # only its index and width are used
            samples=samples.loc[test],
            features=ScaledFeatures(features, FeatureScaler(o.feature_mean, o.feature_std)),
        )
        out[:, [pos[s] for s in test]] = untrained_predictions(
            cohort,
            cfg.hidden(o.width),
            cfg.null_inits,
            cfg.ks,
            cfg.dropout,
            seed=seed,
            device=cfg.device,
            standardize=False,  # already scaled with the outer fold's training samples
        )
    return out


def evaluate_regression(
    result: NestedCVResult,
    targets: pd.DataFrame,
    features: Mapping[str, np.ndarray],
    samples: pd.DataFrame,
) -> Evaluation:
    """Per output and cancer type: Pearson R on the outer test folds, untrained null, Holm–Šidák and BH.

    See :func:`napari_he2rna.model.evaluation.evaluate` (R within each outer fold, averaged over folds).
    """
    cfg = result.config
    null = untrained_null(result, features, samples) if cfg.null_inits > 0 else None
    truth = targets.loc[result.sample_ids, result.names]
    types = samples.loc[result.sample_ids, "cancer_type"].astype(str).to_numpy()
    with np.errstate(divide="ignore"):  # statsmodels' Holm-Sidak takes log1p(-p), -inf for p = 1: harmless
        return evaluate(truth, result.oof, types, result.folds, null, alpha=cfg.alpha)


def evaluate_classifier(result: NestedCVResult, labels: pd.Series, samples: pd.DataFrame) -> dict[str, Any]:
    """ROC AUC of the outer test predictions over patients (pooled folds, per fold, per cancer type).

    ``p_mann_whitney``: one-sided Mann–Whitney U test that responders' patient scores are higher (AUC > 0.5).
    """
    from scipy.stats import mannwhitneyu

    ids = result.sample_ids
    score = result.oof.iloc[:, 0].to_numpy(np.float64)
    y = labels.loc[ids].to_numpy(np.float64)
    patients = samples.loc[ids, "patient_id"].astype(str).to_numpy()
    types = samples.loc[ids, "cancer_type"].astype(str).to_numpy()
    per = pd.DataFrame({"s": score, "y": y, "p": patients}).groupby("p").agg(s=("s", "mean"), y=("y", "max"))
    pos, neg = per.loc[per["y"] == 1, "s"], per.loc[per["y"] == 0, "s"]
    p_mw = (
        float(mannwhitneyu(pos, neg, alternative="greater").pvalue) if len(pos) and len(neg) else float("nan")
    )
    fold_auc = [
        patient_auc(score[result.folds == f], y[result.folds == f], patients[result.folds == f])
        for f in range(len(result.outer))
    ]
    type_auc = {
        t: patient_auc(score[types == t], y[types == t], patients[types == t]) for t in sorted(set(types))
    }

    def clean(v: float) -> float | None:
        return None if not np.isfinite(v) else round(float(v), 4)

    return {
        "auc_patients": clean(patient_auc(score, y, patients)),
        "p_mann_whitney": None if not np.isfinite(p_mw) else float(f"{p_mw:.3g}"),
        "auc_per_outer_fold": [clean(a) for a in fold_auc],
        "auc_outer_fold_mean": clean(float(np.nanmean(fold_auc))) if np.isfinite(fold_auc).any() else None,
        "auc_per_cancer_type": {t: clean(a) for t, a in type_auc.items()},
        "n_samples": int(len(ids)),
        "n_patients": int(len(per)),
        "n_responder_patients": int(len(pos)),
    }


# ------------------------------------------------------------------------------------------ the pipeline


@dataclass
class SlideExResult:
    """Everything one SLIDE-EX run produced (see :func:`run_slide_ex`)."""

    samples: pd.DataFrame  # matched sample sheet (index sample ids)
    folds: pd.Series  # outer fold per sample (shared by every task)
    celltypes: dict[str, NestedCVResult] = field(default_factory=dict)
    abundance: NestedCVResult | None = None
    responder: NestedCVResult | None = None
    evaluations: dict[str, Evaluation] = field(default_factory=dict)  # cell type or "abundance"
    responder_evaluation: dict[str, Any] | None = None
    original_names: dict[str, tuple[str, str]] = field(default_factory=dict)  # output -> (cell type, gene)
    notes: list[str] = field(default_factory=list)
    config: NestedCVConfig | None = None

    def regressions(self) -> dict[str, NestedCVResult]:
        out = dict(self.celltypes)
        if self.abundance is not None:
            out[ABUNDANCE] = self.abundance
        return out

    def per_gene(self) -> pd.DataFrame:
        """One row per (target, cancer type, output): R on the outer test folds, p-values, significance."""
        frames = []
        for target, ev in self.evaluations.items():
            df = ev.per_gene.rename(columns={"gene": "name"}).copy()
            df.insert(0, "target", target)
            df.insert(1, "cell_type", [self.original_names.get(n, ("", ""))[0] for n in df["name"]])
            df.insert(2, "gene", [self.original_names.get(n, ("", ""))[1] for n in df["name"]])
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def _short(self, target: str, name: str) -> str:
        """A cell type's gene without the cell type; abundances keep their full name."""
        ct, gene = self.original_names.get(name, ("", name))
        return gene if target == ct else name

    def summary(self) -> pd.DataFrame:
        """One row per (target, cancer type): outputs, mean R, significant outputs (Holm–Šidák, BH), names."""
        rows = []
        for target, ev in self.evaluations.items():
            for _, s in ev.summary.iterrows():
                sub = ev.per_gene[ev.per_gene["cancer_type"] == s["cancer_type"]]
                row = {
                    "target": target,
                    "cancer_type": s["cancer_type"],
                    "n_samples": int(s["n_samples"]),
                    "n_outputs": int(s["n_genes"]),
                    "mean_r": float(s["mean_r"]),
                }
                if "significant" in sub:
                    sig = sub[sub["significant"].astype(bool)]
                    row.update(
                        n_significant_holm_sidak=int(len(sig)),
                        n_significant_bh=int(sub["significant_bh"].astype(bool).sum()),
                        significant=";".join(
                            self._short(target, n) for n in sig.sort_values("r", ascending=False)["gene"]
                        ),
                    )
                rows.append(row)
        return pd.DataFrame(rows)


def _renumber(folds: np.ndarray) -> np.ndarray:
    """Fold numbers 0..k-1 (a subset of samples may leave a fold empty)."""
    return np.unique(folds, return_inverse=True)[1].astype(np.int64)


def run_slide_ex(
    features: Mapping[str, np.ndarray],
    samples: pd.DataFrame,
    targets: DeconvolvedTargets,
    responders: pd.Series | None = None,
    config: NestedCVConfig | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> SlideExResult:
    """SLIDE-EX: nested CV per cell type (expression), for the abundances, and the responder classifier.

    Parameters
    ----------
    features
        ``sample_id -> (n_supertiles, dim)`` slide features.
    samples
        Sample sheet (:func:`napari_he2rna.cohorts.cohort.load_samples`): ``patient_id``, ``cancer_type``.
    targets
        :func:`load_deconvolved`.
    responders
        :func:`read_responders` (0/1 per sample), or None to skip the classifier.
    config
        :class:`NestedCVConfig`.

    Returns
    -------
    SlideExResult

    Raises
    ------
    DataError
        Samples of the targets or the responder table missing from the sample sheet, no sample with
        features, too few patients for the folds.
    """
    config = config or NestedCVConfig()
    notes = list(targets.notes)
    ids = [str(s) for s in targets.sample_ids]
    if not ids:
        raise DataError("The deconvolved targets hold no sample.")
    resp_ids = [str(s) for s in responders.index] if responders is not None else []
    for what, group in (("deconvolved tables", ids), ("responder table", resp_ids)):
        unknown = [s for s in group if s not in samples.index]
        if unknown:
            raise DataError(
                f"{len(unknown)} samples of the {what} are not in the sample sheet (e.g. {unknown[:3]}); "
                "every sample needs a patient id so that patients are never split across folds."
            )
    all_ids = list(dict.fromkeys(ids + resp_ids))
    no_feat = [s for s in all_ids if s not in features]
    if no_feat:
        notes.append(f"{len(no_feat)} samples without features left out (e.g. {', '.join(no_feat[:3])})")
    all_ids = [s for s in all_ids if s in features]
    ids = [s for s in ids if s in features]
    if not ids:
        raise DataError("No sample of the deconvolved targets has slide features; check the sample ids.")
    sheet = samples.loc[all_ids]
    folds = pd.Series(
        outer_folds(sheet, config.outer_folds, config.seed, responders), index=all_ids, name="fold"
    )

    tasks: list[tuple[str, pd.DataFrame, str]] = []
    original: dict[str, tuple[str, str]] = {}
    for ct, tab in targets.expression.items():
        tab = tab.loc[ids]
        names = [target_name(ct, g) for g in tab.columns]
        original.update({n: (ct, str(g)) for n, g in zip(names, tab.columns, strict=True)})
        tasks.append((ct, tab.set_axis(names, axis=1), "regression"))
    if targets.abundance is not None:
        ab = targets.abundance.loc[ids]
        names = [abundance_name(c) for c in ab.columns]
        original.update({n: (str(c), ABUNDANCE) for n, c in zip(names, ab.columns, strict=True)})
        tasks.append((ABUNDANCE, ab.set_axis(names, axis=1), "regression"))
    if responders is not None:
        lab = responders.loc[[s for s in resp_ids if s in features]]
        if lab.nunique() < 2:
            raise DataError(
                "The responders with features all have the same label; the classifier needs both."
            )
        tasks.append((RESPONDER, lab.astype(np.float32).to_frame(RESPONDER), "classification"))

    per_task = config.outer_folds * (len(config.widths) * config.inner_folds + 1)
    out = SlideExResult(samples=sheet, folds=folds, original_names=original, notes=notes, config=config)
    for t, (name, tab, task) in enumerate(tasks):

        def prog(d: int, total: int, msg: str, t=t, name=name) -> None:
            report(progress, t * per_task + d, len(tasks) * per_task, f"{name}: {msg}")

        res = nested_cross_validate(
            features, tab, sheet, config, task, _renumber(folds.loc[tab.index].to_numpy()), prog, cancel
        )
        if task == "classification":
            out.responder = res
            out.responder_evaluation = evaluate_classifier(res, responders, sheet)
        else:
            if name == ABUNDANCE:
                out.abundance = res
            else:
                out.celltypes[name] = res
            out.evaluations[name] = evaluate_regression(res, tab, features, sheet)
    return out
