"""Making a slide and a cohort (the public entry points), and reading a cohort back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from ..jobs import CancelToken, ProgressCallback, check_cancel, report
from ..safe_output import atomic_write_text, prepare_folder, staged_folder
from .biology import HOUSEKEEPING, control_genes, expression_from_signals, msi_probability
from .drawing import draw_slide
from .params import (
    CANCER_PROFILES,
    CANCER_TYPES,
    CELL_TYPES,
    IMMUNE_PHENOTYPES,
    IMMUNE_PRIOR,
    MPP,
    TILE_UM,
    SlideParams,
    apply_phenotype,
    draw_params,
)
from .truth import SlideTruth, truth_rasters
from .writers import (
    write_celltype_targets,
    write_gene_roles,
    write_pyramid_tiff,
    write_table,
    write_truth_files,
)


@dataclass
class CohortInfo:
    """A generated cohort: the folder, its sample sheet, expression and cell abundance tables."""

    out_dir: Path
    samples: pd.DataFrame  # sample_id, patient_id, cancer_type, slide, msi_status, seed
    expression: pd.DataFrame  # index sample_id, one column per gene
    abundance: pd.DataFrame  # index sample_id, drivers (densities and fractions)
    truths: list[SlideTruth] = field(default_factory=list)
    # cell-type-resolved targets (SLIDE-EX): {type: samples x genes}, samples x types, 0/1 per sample
    celltype_expression: dict[str, pd.DataFrame] = field(default_factory=dict)
    celltype_abundance: pd.DataFrame = field(default_factory=pd.DataFrame)
    responders: pd.Series = field(default_factory=lambda: pd.Series(dtype=int, name="responder"))

    def slide_path(self, sample_id: str) -> Path:
        row = self.samples.set_index("sample_id").loc[sample_id]
        return self.out_dir / row["slide"]


# --- public API --------------------------------------------------------------------------------------------


def make_slide(
    path: str | Path,
    seed: int = 0,
    size_px: tuple[int, int] = (1792, 1792),
    cancer_type: str | None = None,
    mpp: float = MPP,
    params: SlideParams | None = None,
    truth_dir: str | Path | None = None,
    write_truth: bool = True,
) -> SlideTruth:
    """Draw one synthetic H&E slide, write it as a pyramidal TIFF and its truth files next to it.

    Parameters
    ----------
    path : the ``.tiff`` to write; its stem is the slide id and prefixes the truth files.
    seed : everything (layout, cells, colours, truth) follows from it.
    size_px : level-0 (width, height) in px.
    cancer_type : one of :data:`CANCER_TYPES` (random from the seed if None); ignored with ``params``.
    mpp : µm per level-0 px (tile side is round(112 / mpp) px).
    params : the latent composition; drawn from the seed when None.
    truth_dir : where the truth files go (default: the slide's folder).
    write_truth : write the truth files (the returned :class:`SlideTruth` holds them in any case).

    Returns
    -------
    SlideTruth
    """
    path = Path(path)
    w, h = int(size_px[0]), int(size_px[1])
    if w < 64 or h < 64:
        raise DataError(f"A synthetic slide must be at least 64x64 px, not {w}x{h}.")
    rng = np.random.default_rng(seed)
    p = params if params is not None else draw_params(rng, cancer_type)
    tile_px = int(round(TILE_UM / mpp))
    lay, cells, rgb = draw_slide(rng, w, h, p, mpp)
    # Truth rasters: epithelium mask at MASK_DOWNSAMPLE (majority of its 8x8 block), tumour polygons at 2x.
    epi_mask, polys, tumor_ds, tiles = truth_rasters(lay.labels, lay.tumor_score, cells, w, h, tile_px)

    slide_id = path.stem
    desc = f"napari-he2rna synthetic H&E slide {slide_id} seed={seed} cancer_type={p.cancer_type} mpp={mpp}"
    prepare_folder(path.parent)
    write_pyramid_tiff(path, rgb, mpp, description=desc)
    truth = SlideTruth(
        slide_id, path, (w, h), mpp, tile_px, p, cells, tiles, epi_mask, polys, {"slide": path}
    )
    if write_truth:
        write_truth_files(truth, Path(truth_dir) if truth_dir is not None else path.parent, tumor_ds, rng)
    return truth


def make_cohort(
    out_dir: str | Path,
    n_slides: int = 30,
    seed: int = 0,
    size_px: tuple[int, int] = (1792, 1792),
    cancer_types: Sequence[str] | None = None,
    second_slide_fraction: float = 0.2,
    names: Sequence[str] | None = None,
    mpp: float = MPP,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    n_controls: int = len(HOUSEKEEPING),
    phenotypes: Mapping[str, float] | None = None,
) -> CohortInfo:
    """Generate a cohort of synthetic slides with truth, sample sheet and expression table in ``out_dir``.

    Patients get one slide, or two (a fraction ``second_slide_fraction`` of patients) that share the
    patient's cancer type and lymphocyte levels (x LogNormal(0, 0.15) each). Cancer types cycle through
    ``cancer_types`` (default all three). The MSI-like label is drawn once per patient, from the mean
    T- and B-cell densities of the patient's slides: every slide of a patient carries the same label.

    Parameters
    ----------
    out_dir : folder to write into (created).
    n_slides : number of slides (>= 1).  seed : everything follows from it.
    size_px : level-0 (width, height) of every slide, px.  mpp : µm per level-0 px.
    cancer_types : the types to cycle through.  names : sample ids (one per slide; default SYN-0000, ...).
    second_slide_fraction : probability that a patient gets a second slide.
    n_controls : noise-only control genes in ``expression.tsv`` (:func:`control_genes`: 20 = the
        :data:`HOUSEKEEPING` genes; more adds ``CTRL0001``, ...).
    phenotypes : immune phenotype -> share of patients (:data:`IMMUNE_PHENOTYPES`: ``mixed``, ``t-only``,
        ``aggregates``); patients of each cancer type get them in these shares, in turn (a patient's slides
        share it); the rest of the cohort is drawn as without it. Default: every patient ``mixed``.
        ``samples.tsv`` names each slide's phenotype (column ``immune_phenotype``).

    Files: ``<id>.tiff`` and its truth files (see :func:`make_slide`), ``samples.tsv``, ``expression.tsv``,
    ``cell_abundance.tsv``, the SLIDE-EX targets (:func:`write_celltype_targets`) and ``genes.tsv``, which
    genes are planted and which are controls (:func:`write_gene_roles`). Deterministic from ``seed``.
    """
    out = Path(out_dir)
    if isinstance(n_slides, bool) or not isinstance(n_slides, (int, np.integer)) or n_slides < 1:
        raise DataError(f"A cohort needs a whole number of slides >= 1, not {n_slides!r}.")
    if names is not None and len(names) != n_slides:
        raise DataError(f"{len(names)} names were given for {n_slides} slides.")
    if not 0.0 <= second_slide_fraction <= 1.0:
        raise DataError(f"second_slide_fraction must lie in [0, 1], not {second_slide_fraction!r}.")
    controls = control_genes(n_controls)
    pheno_names, pheno_p = _phenotype_shares(phenotypes)
    pheno_counts: dict[str, np.ndarray] = {}  # per cancer type: patients given each phenotype so far
    types = list(cancer_types) if cancer_types else list(CANCER_TYPES)
    for t in types:
        if t not in CANCER_PROFILES:
            raise DataError(f"Unknown synthetic cancer type {t!r}; choose among {', '.join(CANCER_TYPES)}.")
    root = np.random.SeedSequence(seed)
    plan_rng, expr_rng, label_rng = (np.random.default_rng(s) for s in root.spawn(3))
    slide_seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence([seed, 1]).spawn(n_slides)]

    # Patients and their latent parameters.
    plan: list[tuple[str, SlideParams, str]] = []
    pi = 0
    while len(plan) < n_slides:
        ctype = types[pi % len(types)]
        base = draw_params(plan_rng, ctype)
        pid = f"SYN-P{pi:04d}"
        # Smooth weighted round-robin within the cancer type: every type gets the asked shares, not a draw.
        counts = pheno_counts.setdefault(ctype, np.zeros(len(pheno_names)))
        j = int(np.argmax(pheno_p * (counts.sum() + 1) - counts))
        counts[j] += 1
        pheno = pheno_names[j]
        plan.append((pid, base, pheno))
        if len(plan) < n_slides and plan_rng.random() < second_slide_fraction:
            twin = draw_params(plan_rng, ctype)  # another block: same patient's cancer and immune levels
            for key in IMMUNE_PRIOR:
                setattr(twin, key, getattr(base, key) * float(plan_rng.lognormal(0, 0.15)))
            plan.append((pid, twin, pheno))
        pi += 1
    for _pid, params, pheno in plan:
        apply_phenotype(params, pheno)

    # Every file is written into a staging folder inside out_dir and moved into place at the end: an
    # interrupted run leaves the folder as it was (napari_he2rna.safe_output.staged_folder).
    with staged_folder(out, overwrite=True) as stage:
        rows, expr, abund, truths = [], [], [], []
        patient_signals: dict[str, list[dict[str, float]]] = {}
        for i, (pid, params, pheno) in enumerate(plan):
            check_cancel(cancel)
            sid = names[i] if names is not None else f"SYN-{i:04d}"
            truth = make_slide(stage / f"{sid}.tiff", slide_seeds[i], size_px, mpp=mpp, params=params)
            sig = truth.signals()
            patient_signals.setdefault(pid, []).append(sig)
            expr.append({"sample_id": sid, **expression_from_signals(sig, expr_rng, controls)})
            rows.append(
                {
                    "sample_id": sid,
                    "patient_id": pid,
                    "cancer_type": params.cancer_type,
                    "slide": f"{sid}.tiff",
                    "msi_status": "",
                    "seed": slide_seeds[i],
                    **({"immune_phenotype": pheno} if phenotypes else {}),
                }
            )
            counts = truth.cells["type"].value_counts()
            total = max(len(truth.cells), 1)
            abund.append(
                {
                    "sample_id": sid,
                    **{k: round(v, 6) for k, v in sig.items()},
                    **{
                        f"{t.replace(' ', '_')}_fraction": round(counts.get(t, 0) / total, 6)
                        for t in CELL_TYPES
                    },
                }
            )
            truth.cells = truth.cells.iloc[:0]  # keep the cohort object light; the tables are on disk
            truths.append(truth)
            report(progress, i + 1, n_slides, sid)
        # Patient-level label: one draw per patient (in patient order) from the mean signals of its slides.
        status = {}
        for pid, sigs in patient_signals.items():
            mean_sig = {k: float(np.mean([s[k] for s in sigs])) for k in ("t_density", "b_density")}
            status[pid] = "MSI-H" if label_rng.random() < msi_probability(mean_sig) else "MSS"
        for row in rows:
            row["msi_status"] = status[row["patient_id"]]
        samples = pd.DataFrame(rows)
        expression = pd.DataFrame(expr).set_index("sample_id")
        abundance = pd.DataFrame(abund).set_index("sample_id")
        write_table(stage / "samples.tsv", samples, "\t")
        atomic_write_text(stage / "expression.tsv", expression.round(5).to_csv(sep="\t", lineterminator="\n"))
        atomic_write_text(stage / "cell_abundance.tsv", abundance.to_csv(sep="\t", lineterminator="\n"))
        write_celltype_targets(stage, seed)
        write_gene_roles(stage / "genes.tsv", controls)
    for truth in truths:  # where the files are now
        truth.path = out / truth.path.relative_to(stage)
        truth.files = {k: out / Path(v).relative_to(stage) for k, v in truth.files.items()}
    info = load_cohort(out)
    return CohortInfo(
        out,
        samples,
        expression,
        abundance,
        truths,
        info.celltype_expression,
        info.celltype_abundance,
        info.responders,
    )


def _phenotype_shares(phenotypes: Mapping[str, float] | None) -> tuple[list[str], np.ndarray]:
    """The phenotype names and their probabilities (normalised), checked; ``mixed`` alone when None."""
    if not phenotypes:
        return ["mixed"], np.ones(1)
    names = list(phenotypes)
    for name in names:
        if name not in IMMUNE_PHENOTYPES:
            raise DataError(
                f"Unknown immune phenotype {name!r}; choose among {', '.join(IMMUNE_PHENOTYPES)}."
            )
    shares = np.array([float(phenotypes[n]) for n in names])
    if not np.all(np.isfinite(shares)) or np.any(shares < 0) or shares.sum() <= 0:
        raise DataError(f"Phenotype shares must be >= 0 with a positive sum, not {dict(phenotypes)}.")
    return names, shares / shares.sum()


def load_cohort(out_dir: str | Path) -> CohortInfo:
    """Read a cohort written by :func:`make_cohort` (sample sheet, expression, abundances)."""
    out = Path(out_dir)
    sheet = out / "samples.tsv"
    if not sheet.is_file():
        raise DataError(f"{out} holds no samples.tsv; generate a cohort with `he2rna make-sample {out}`.")
    samples = pd.read_csv(sheet, sep="\t", dtype={"sample_id": str, "patient_id": str})
    expression = pd.read_csv(out / "expression.tsv", sep="\t", index_col=0)
    ab_path = out / "cell_abundance.tsv"
    abundance = pd.read_csv(ab_path, sep="\t", index_col=0) if ab_path.is_file() else pd.DataFrame()
    ct_expr = {
        p.stem: pd.read_csv(p, sep="\t", index_col=0)
        for p in sorted((out / "celltype_expression").glob("*.tsv"))
    }
    ct_path, resp_path = out / "celltype_abundance.tsv", out / "responders.tsv"
    ct_abund = pd.read_csv(ct_path, sep="\t", index_col=0) if ct_path.is_file() else pd.DataFrame()
    responders = (
        pd.read_csv(resp_path, sep="\t", dtype={"sample_id": str}).set_index("sample_id")["responder"]
        if resp_path.is_file()
        else pd.Series(dtype=int, name="responder")
    )
    return CohortInfo(out, samples, expression, abundance, [], ct_expr, ct_abund, responders)
