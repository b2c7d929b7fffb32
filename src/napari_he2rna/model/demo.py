"""The bundled demo model: HE2RNA trained by this package's own pipeline on the synthetic sample cohort.

:func:`build_demo_model` runs, end to end and deterministically from a seed, exactly what a user runs on
real data: ``make_cohort`` (slides with planted truth and an expression table driven by it) -> "hed-stats"
tile features in the feature cache -> supertiles -> patient-grouped 5-fold cross-validated training ->
evaluation of the out-of-fold predictions against the same architecture untrained (empirical p,
Holm–Šidák and Benjamini–Hochberg per cancer type) -> one model bundle flagged ``demo`` and its report.

The model means nothing on real tissue: it learnt the colour statistics of drawn slides. Its point is that
the planted truth is known, so the whole chain can be checked: genes with a planted driver (T cells, B
cells, epithelium, proliferation, stroma, fat) must come out significant on held-out slides and the
housekeeping controls (noise only) must not; on a slide, the T-cell genes must be hot where T cells are.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..jobs import CancelToken, ProgressCallback, check_cancel, report
from ..safe_output import atomic_write_text

if TYPE_CHECKING:  # numpy/pandas/torch load when a build runs, not when the CLI lists commands
    import pandas as pd

    from .evaluation import Evaluation

log = logging.getLogger(__name__)

BACKBONE = "hed-stats"
TILE_UM = 112.0

#: Defaults of the committed demo model (see sample_data/README.md, "Demo model").
DEFAULT_N_SLIDES = 300
DEFAULT_SIZE_PX = (1344, 1344)
DEFAULT_HIDDEN = (256, 256)  # the paper's size for gene subsets; `he2rna train --hidden 256 256`
# The rest are `he2rna train --model-type he2rna`'s defaults: the demo is the paper's HE2RNA alone, trained as
# a user's model of that type is (train's default is HE2RNA anchored to and averaged with ridge).
DEFAULT_EPOCHS = 200
DEFAULT_PATIENCE = 50
DEFAULT_LR = 3e-4
DEFAULT_NULL_INITS = 100  # 100 x 37 genes null R per type: smallest empirical p ~ 2.7e-4, room for Holm-Sidak


def planted_gene_sets() -> dict[str, list[str]]:
    """The synthetic panel grouped by planted driver (``t_density`` -> T-cell genes, ...)."""
    from ..synthetic import GENE_PANEL

    sets: dict[str, list[str]] = {}
    for gene, (driver, *_rest) in GENE_PANEL.items():
        if driver:
            sets.setdefault(driver, []).append(gene)
    return sets


def significance_counts(per_gene: pd.DataFrame, column: str = "significant") -> dict[str, dict[str, int]]:
    """Per cancer type: how many planted and how many control genes are significant.

    Parameters
    ----------
    per_gene
        ``Evaluation.per_gene`` (or the committed ``per_gene.csv``): ``cancer_type``, ``gene``, ``column``.
    """
    from ..synthetic import GENE_PANEL, is_control_gene

    out: dict[str, dict[str, int]] = {}
    for t, sub in per_gene.groupby("cancer_type", sort=True):
        sig = sub.set_index("gene")[column].astype(bool)
        planted = [g for g in GENE_PANEL if g in sig.index]
        controls = [g for g in sig.index if is_control_gene(g)]
        out[str(t)] = {
            "planted_significant": int(sig[planted].sum()),
            "planted": len(planted),
            "controls_significant": int(sig[controls].sum()),
            "controls": len(controls),
        }
    return out


def _r_table(per_gene: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """``{gene: {cancer_type: R}}`` (out-of-fold, mean over folds), JSON-able."""
    import numpy as np

    wide = per_gene.pivot(index="gene", columns="cancer_type", values="r")
    return {
        str(g): {str(t): (None if not np.isfinite(v) else round(float(v), 4)) for t, v in row.items()}
        for g, row in wide.iterrows()
    }


def _cohort_ready(cohort_dir: Path, stamp: dict[str, Any]) -> bool:
    path = cohort_dir / "demo_cohort.json"
    if not (path.is_file() and (cohort_dir / "samples.tsv").is_file()):
        return False
    try:
        return json.loads(path.read_text()) == stamp
    except (OSError, ValueError):
        return False


def build_demo_model(
    out_path: str | Path,
    work_dir: str | Path,
    n_slides: int = DEFAULT_N_SLIDES,
    seed: int = 0,
    size_px: tuple[int, int] = DEFAULT_SIZE_PX,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    epochs: int = DEFAULT_EPOCHS,
    patience: int = DEFAULT_PATIENCE,
    lr: float = DEFAULT_LR,
    n_folds: int = 5,
    null_inits: int = DEFAULT_NULL_INITS,
    report_dir: str | Path | None = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> tuple[Path, Evaluation]:
    """Generate the synthetic cohort, train HE2RNA on it with cross-validation, evaluate, save the bundle.

    Every step is the package's public pipeline; nothing here is specific to synthetic data except where
    the cohort comes from. Deterministic from ``seed`` (on CPU; the default ``device="cpu"`` also keeps the
    committed bytes independent of a GPU being present).

    Parameters
    ----------
    out_path
        The model bundle to write (``.safetensors``), flagged ``demo``.
    work_dir
        Scratch folder: ``cohort/`` (slides, sample sheet, expression), ``features/`` (the feature cache)
        and ``checkpoints/`` (finished folds). Reused by a rerun with the same cohort settings, so only the
        missing steps are redone.
    n_slides, seed, size_px
        The cohort (:func:`napari_he2rna.synthetic.make_cohort`); ``size_px`` is level-0 (width, height)
        at 0.5 µm/px (1344 px = 672 µm = 6 x 6 tiles of 112 µm).
    hidden, epochs, patience, lr, n_folds
        Training (:class:`napari_he2rna.model.training.TrainConfig`, supertile mode, batch 16).
    null_inits
        Random inits of the untrained architecture for the significance test.
    report_dir
        Where the evaluation report goes (default ``<out_path stem>_report`` next to the bundle).
    device
        Torch device for features and training.
    progress, cancel
        See :mod:`napari_he2rna.jobs`; progress runs over the five stages, the message says which.

    Returns
    -------
    (Path, Evaluation)
        The bundle written and its :class:`napari_he2rna.model.evaluation.Evaluation` (the report is in
        ``report_dir``).
    """
    import torch

    # Everything here is small per call (224 px tiles in batches of 32; a (16 slides x ~20 tiles) x 33 -> 256
    # -> 256 -> 37 network): intra-op threads buy little, and on a busy machine their spin-waits made each
    # training step ~10x slower (measured 730 vs 76 ms per step on 2 shared cores). So one thread for this
    # build; the caller's setting is restored afterwards.
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(
            out_path,
            work_dir,
            n_slides,
            seed,
            size_px,
            hidden,
            epochs,
            patience,
            lr,
            n_folds,
            null_inits,
            report_dir,
            device,
            progress,
            cancel,
        )
    finally:
        torch.set_num_threads(n_threads)


def _build(
    out_path,
    work_dir,
    n_slides,
    seed,
    size_px,
    hidden,
    epochs,
    patience,
    lr,
    n_folds,
    null_inits,
    report_dir,
    device,
    progress,
    cancel,
):

    from ..cohorts.cohort import cohort_features, load_expression, load_samples, match_cohort
    from ..synthetic import is_control_gene, make_cohort
    from .evaluation import SUMMARY_COLUMNS, write_report
    from .fitting import evaluate_result, fit, null_predictions, save_result
    from .training import TrainConfig

    out = Path(out_path)
    if out.suffix.lower() != ".safetensors":
        out = out.with_suffix(".safetensors")
    work = Path(work_dir)
    cohort_dir = work / "cohort"
    report_dir = Path(report_dir) if report_dir is not None else out.with_name(f"{out.stem}_report")
    size_px = (int(size_px[0]), int(size_px[1]))
    stages = 5

    def stage(i: int, name: str, done: int = 0, total: int = 1, msg: str = "") -> None:
        # One bar over the stages: stage i spans [i, i + 1) of `stages`, scaled to per-mille.
        frac = (i + (done / total if total else 1.0)) / stages
        report(progress, int(round(1000 * frac)), 1000, f"{name}: {msg}" if msg else name)

    # 1. The cohort (slides + planted truth + expression), regenerated only when its settings changed.
    t0 = time.perf_counter()
    stamp = {"n_slides": int(n_slides), "seed": int(seed), "size_px": list(size_px)}
    if not _cohort_ready(cohort_dir, stamp):
        make_cohort(
            cohort_dir,
            n_slides=n_slides,
            seed=seed,
            size_px=size_px,
            progress=lambda d, t, m: stage(0, "slides", d, t, m),
            cancel=cancel,
        )
        atomic_write_text(cohort_dir / "demo_cohort.json", json.dumps(stamp))
    log.info("demo model: cohort took %.1f s", time.perf_counter() - t0)

    # 2. Features (the shared zarr cache: a rerun reads them back) and their supertiles.
    t0 = time.perf_counter()
    samples = load_samples(cohort_dir / "samples.tsv")
    expression = load_expression(cohort_dir / "expression.tsv", transform="log")
    feats, failed = cohort_features(
        samples,
        BACKBONE,
        TILE_UM,
        cache_dir=work / "features",
        supertiles=True,
        device=device,
        progress=lambda d, t, m: stage(1, "features", d, t, m),
        cancel=cancel,
    )
    if failed:
        from ..errors import DataError

        sid, why = next(iter(failed.items()))
        raise DataError(f"{len(failed)} synthetic slides gave no features (e.g. {sid}: {why}).")
    cohort, _ = match_cohort(expression, samples, feats)
    log.info("demo model: features took %.1f s", time.perf_counter() - t0)

    # 3. Cross-validated training: the same call as `he2rna train --supertiles --hidden 256 256 --model-type
    # he2rna` (the paper's model alone, not train's default ensemble; inputs standardised per fold inside it;
    # each finished fold is checkpointed, so an interrupted build resumes).
    t0 = time.perf_counter()
    check_cancel(cancel)
    config = TrainConfig(
        mode="supertiles",
        hidden=tuple(hidden),
        lr=lr,
        max_epochs=epochs,
        patience=patience,
        n_folds=n_folds,
        seed=seed,
        device=device,
    )
    result = fit(
        cohort,
        "he2rna",
        config,
        progress=lambda d, t, m: stage(2, "training", d, t, m),
        cancel=cancel,
        checkpoint_dir=work / "checkpoints",
    )
    baseline = fit(cohort, "ridge", config, folds=result.folds, cancel=cancel)
    log.info("demo model: training took %.1f s", time.perf_counter() - t0)

    # 4. Evaluation against the untrained architecture, corrected per cancer type; the ridge baseline on the
    # same folds against the same null.
    t0 = time.perf_counter()
    stage(3, "evaluation", msg="untrained null")
    null = null_predictions(cohort, config, null_inits, seed=seed + 12345, cancel=cancel)
    gene_sets = {f"planted: {k}": v for k, v in planted_gene_sets().items() if len(v) > 1}
    ev = evaluate_result(cohort, result.oof, result.folds, null, gene_sets, 10_000, seed=seed)
    ev_base = evaluate_result(cohort, baseline.oof, baseline.folds, null, gene_sets, 10_000, seed=seed)
    log.info("demo model: evaluation took %.1f s", time.perf_counter() - t0)

    # 5. The bundle (demo flag + what it was trained on + how well it did) and its report.
    stage(4, "saving")
    controls = [g for g in cohort.genes if is_control_gene(g)]
    summary_cols = [c for c in SUMMARY_COLUMNS if c in ev.summary]
    extra = {
        "trained_on": (
            f"synthetic sample cohort (napari-he2rna make-sample, seed {seed}, {len(cohort.sample_ids)} "
            f"slides of {size_px[0]} x {size_px[1]} px at 0.5 µm/px)"
        ),
        "demo_note": (
            "Demo model trained on synthetic slides drawn by napari_he2rna.synthetic; it means nothing on "
            "real tissue."
        ),
        "synthetic_cohort": {
            "n_slides": int(n_slides),
            "seed": int(seed),
            "size_px": list(size_px),
            "planted_genes": {k: v for k, v in planted_gene_sets().items()},
            "control_genes": controls,
        },
        "evaluation": {
            "summary": json.loads(ev.summary[summary_cols].to_json(orient="records")),
            "significance_counts_holm_sidak": significance_counts(ev.per_gene, "significant"),
            "significance_counts_bh": significance_counts(ev.per_gene, "significant_bh"),
            "null_inits": int(null_inits),
        },
        "per_gene_r": _r_table(ev.per_gene),
    }
    extra["baseline"] = {
        "model": "ridge on the slide-mean feature (he2rna train --model-type ridge), same folds, same null",
        "summary": json.loads(ev_base.summary[summary_cols].to_json(orient="records")),
        "significance_counts_bh": significance_counts(ev_base.per_gene, "significant_bh"),
    }
    save_result(result, cohort, out, BACKBONE, TILE_UM, extra, demo=True, cancel=cancel)
    report_path = write_report(
        ev,
        report_dir,
        title="HE2RNA demo model evaluation (DEMO: synthetic slides, held-out folds)",
        baseline=ev_base,
    )
    stage(5, "done", msg=f"report {report_path}")
    return out, ev
