"""``he2rna compare``: check tile scores against ground truth (cells, masks, annotations), slide or cohort.

One slide::

    he2rna compare --scores S_tile_scores.csv --slide S.svs --cells S_CD3.tsv --class Positive \
        --column "T cells" --column "B cells" --out DIR

writes ``DIR/tiles.csv`` (tile id, position, scores, truth per tile) and ``DIR/metrics.csv`` (long table:
score, truth, metric, subset, value, threshold, n_positive, note). A cohort::

    he2rna compare --manifest cohort.csv --column "T cells" --out DIR

where ``cohort.csv`` has one row per slide with columns ``slide, scores`` and any of ``cells, class, mask,
mask_mpp, mask_channel, annotations, annotation_class, negative_class, mpp, width, height, transform`` (paths
relative to the manifest; empty cells fall back to the command-line options), writes ``DIR/per_slide.csv``
(one row per slide, score and truth, then mean/median/sd rows over slides), ``DIR/metrics.csv`` and
``DIR/<slide>_tiles.csv``.

Truth drawn on another scan (an IHC consecutive section): ``--transform transform.json`` from ``he2rna
align HE IHC`` maps it onto the slide (QuPath µm read at the IHC's pixel size); ``--offset-um/--scale/
--rotation`` set a simple alignment by hand instead.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataError
from ..safe_output import atomic_write_text, prepare_folder
from ._common import add_slide_column_argument

if TYPE_CHECKING:
    import pandas as pd

#: The annotation truth's name in the metrics tables, and its column in the per-tile table.
ANNOTATION = "annotation"
ANNOTATION_COLUMN = "inside annotation"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare tile scores with ground truth (QuPath cells, masks, annotations): R, AUC, top-N",
        description=(
            "Compare per-tile scores (from he2rna spatialize or predict) with ground truth aligned by "
            "microns: QuPath cell detections (counts per tile), a segmentation mask (fraction per tile) or "
            "GeoJSON annotations (label per tile). Reports Pearson R (two-tailed p) and Spearman rho, "
            "ROC-AUC for tiles above the 75/90/95/99th percentile of the count, the median count in the "
            "top-N tiles, and for annotations the inside-vs-outside AUC and the share of top-N tiles inside. "
            "Tile-level p-values treat neighbouring tiles as independent and are optimistic; --spatial-null "
            "adds a circular-shift null."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("one slide")
    src.add_argument("--scores", type=Path, help="tile-scores CSV written by he2rna spatialize or predict")
    src.add_argument("--slide", type=Path, help="the slide the scores belong to (for its size and µm/px)")
    src.add_argument("--slide-size", type=int, nargs=2, metavar=("W", "H"), help="slide size in level-0 px")
    src.add_argument("--mpp", type=float, default=None, help="µm per level-0 pixel (overrides the slide's)")
    src.add_argument("--cells", type=Path, help="QuPath detections: measurement TSV/CSV or GeoJSON")
    src.add_argument("--mask", type=Path, help="segmentation mask image covering the slide (PNG/TIFF)")
    src.add_argument("--annotations", type=Path, help="QuPath GeoJSON annotations (e.g. tumour polygons)")
    p.add_argument("--manifest", type=Path, help="cohort CSV, one row per slide (see the description)")
    add_slide_column_argument(p)
    p.add_argument("--class", dest="cell_class", action="append", help="cell class to count (repeatable)")
    p.add_argument("--mask-mpp", type=float, default=None, help="µm per mask pixel (default: scale by size)")
    p.add_argument("--mask-channel", default=None, help="channel of a colour mask: red, green or blue")
    p.add_argument(
        "--annotation-class", action="append", help="annotation class that is 'inside' (repeatable)"
    )
    p.add_argument(
        "--negative-class", action="append", help="annotation class that is 'outside'; others left out"
    )
    p.add_argument(
        "--min-fraction", type=float, default=0.5, help="tile share inside a polygon to be 'inside'"
    )
    p.add_argument(
        "--offset-um",
        type=float,
        nargs=2,
        default=(0.0, 0.0),
        metavar=("DX", "DY"),
        help="shift of the truth scan onto the slide, µm",
    )
    p.add_argument("--scale", type=float, default=1.0, help="scale of the truth scan onto the slide")
    p.add_argument("--rotation", type=float, default=0.0, help="rotation of the truth scan, degrees")
    p.add_argument(
        "--transform",
        type=Path,
        default=None,
        help="transform JSON of he2rna align (truth scan = its moving slide); replaces offset/scale/rotation",
    )
    p.add_argument("--column", action="append", help="score column (gene or set) to compare (default: all)")
    p.add_argument(
        "--percentiles", type=float, nargs="+", default=[75, 90, 95, 99], help="AUC percentile cuts"
    )
    p.add_argument("--threshold", type=float, action="append", default=[], help="extra AUC count threshold")
    p.add_argument("--top-n", type=int, default=100, help="top-scored tiles for the median / share metrics")
    p.add_argument(
        "--spatial-null",
        type=int,
        default=0,
        metavar="N",
        help="also a p-value of R from N circular shifts of the score map (0: off)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (created if needed)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------------------


def _atomic_csv(df: pd.DataFrame, path: Path, overwrite: bool) -> None:
    prepare_folder(path.parent)
    atomic_write_text(path, df.to_csv(index=False, float_format="%.6g"), overwrite=overwrite)


def _slide_facts(
    slide: Path | None, size: Any, mpp: float | None
) -> tuple[tuple[int, int] | None, float | None]:
    if slide is not None and Path(slide).is_file():
        from ..slides.slide import open_slide

        with open_slide(slide, mpp=mpp) as s:
            return tuple(s.dimensions), s.mpp
    if size is not None and all(v is not None and not _blank(v) for v in size):
        return (int(float(size[0])), int(float(size[1]))), mpp
    if slide is not None:
        raise DataError(f"the slide {slide} does not exist; give it, or its size with --slide-size W H")
    return None, mpp


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def compare_one(
    scores_path: Path,
    *,
    slide: Path | None = None,
    slide_size: Any = None,
    mpp: float | None = None,
    cells: Path | None = None,
    cell_class: list[str] | None = None,
    mask: Path | None = None,
    mask_mpp: float | None = None,
    mask_channel: str | None = None,
    annotations: Path | None = None,
    annotation_class: list[str] | None = None,
    negative_class: list[str] | None = None,
    min_fraction: float = 0.5,
    alignment: Any = None,
    transform: Any = None,
    columns: list[str] | None = None,
    percentiles: Any = (75, 90, 95, 99),
    thresholds: Any = (),
    top_n: int = 100,
    spatial_null: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, list[dict[str, Any]]]:
    """Everything for one slide: (per-tile table, long metrics table, flat rows per score x truth).

    ``transform`` (an :class:`~napari_he2rna.validation.align.AlignmentResult`, e.g. read from ``he2rna
    align``'s JSON)
    maps a truth drawn on its moving slide onto this one and replaces ``alignment``: the truth's µm are then
    read at the moving slide's pixel size.
    """
    import pandas as pd  # on use: keeps `he2rna --help` from importing it

    from ..validation import metrics, truth
    from ..validation.comparison import Comparison
    from ..validation.transform import Alignment

    dims, mpp = _slide_facts(slide, slide_size, mpp)
    grid, scores = metrics.read_tile_scores(scores_path, slide_dimensions=dims, mpp=mpp)
    truth_mpp = grid.mpp  # µm per px of the scan the truth was drawn on
    if transform is not None:
        expected = tuple(int(v) for v in transform.fixed_dimensions)
        if dims is not None and any(expected) and expected != tuple(dims):
            raise DataError(
                f"the transform was found for a fixed slide of {expected[0]}x{expected[1]} px but this slide "
                f"is {dims[0]}x{dims[1]} px: align the IHC onto this slide"
            )
        alignment = Alignment.from_affine_px(transform.affine_px, grid.mpp)
        truth_mpp = transform.mpp_moving or grid.mpp
    if columns:
        missing = [c for c in columns if c not in scores.columns]
        if missing:
            raise DataError(
                f"{scores_path.name} has no column {', '.join(map(repr, missing))}; "
                f"its score columns are: {', '.join(scores.columns)}"
            )
        scores = scores[columns]
    settings = {
        "scan_mpp": truth_mpp,
        "alignment": alignment,
        "percentiles": percentiles,
        "thresholds": thresholds,
        "top_n": top_n,
    }
    # One comparison per truth, each under its name in the tables (its per-tile values computed in turn, so
    # a bad class or a truth off the slide is reported for the first truth that has it).
    comparisons: dict[str, Comparison] = {}
    if cells is not None:
        c = Comparison.for_grid(
            grid,
            truth.load_truth(cells, truth_mpp, kind="cells"),
            classes=tuple(cell_class) if cell_class else None,
            **settings,
        )
        c.truth_per_tile()
        comparisons[c.label] = c
    if mask is not None:
        c = Comparison.for_grid(
            grid,
            truth.load_truth(mask, truth_mpp, kind="mask", channel=mask_channel),
            mask_mpp=mask_mpp,
            **settings,
        )
        c.truth_per_tile()
        comparisons[c.label] = c
    if annotations is not None:
        c = Comparison.for_grid(
            grid,
            truth.load_truth(annotations, truth_mpp, kind="annotations"),
            classes=tuple(annotation_class) if annotation_class else None,
            negative_classes=tuple(negative_class) if negative_class else None,
            min_fraction=min_fraction,
            **settings,
        )
        c.truth_per_tile()
        comparisons[ANNOTATION] = c
    if not comparisons:
        raise DataError("give some truth to compare with: --cells, --mask or --annotations")
    results: dict[tuple[str, str], Any] = {}
    for col in scores.columns:
        s = scores[col].to_numpy(float)
        for name, comparison in comparisons.items():
            results[(col, name)] = comparison.metrics_for(s)
    truths = {
        ANNOTATION_COLUMN if name == ANNOTATION else name: c.truth_per_tile()
        for name, c in comparisons.items()
    }
    tiles = metrics.compare_table(grid.table, scores, truths)
    long_parts, rows = [], []
    for (col, name), res in results.items():
        t = res.table()
        t.insert(0, "truth", name)
        t.insert(0, "score", col)
        row = {"score": col, "truth": name, **res.as_dict()}
        if spatial_null and name != ANNOTATION:
            null = comparisons[name].spatial_null(scores[col].to_numpy(float), spatial_null)
            row["spatial_null_p"] = null["p"]
            extra = pd.DataFrame(
                [
                    {
                        "score": col,
                        "truth": name,
                        "metric": "pearson_p_spatial_null",
                        "subset": f"{null['n_shifts']} circular shifts",
                        "value": null["p"],
                        "note": null["note"],
                    }
                ]
            )
            t = pd.concat([t, extra], ignore_index=True)
        long_parts.append(t)
        rows.append(row)
    return tiles, pd.concat(long_parts, ignore_index=True), rows


def _alignment(args: argparse.Namespace):
    from ..validation.transform import Alignment

    a = Alignment.from_offset_scale(args.offset_um, args.scale, args.rotation)
    if args.transform is not None and not a.is_identity:
        raise DataError("give either --transform or --offset-um/--scale/--rotation, not both")
    return None if a.is_identity else a


def _transform(path: Path | None):
    if path is None:
        return None
    from ..validation.align import AlignmentResult

    return AlignmentResult.read(path)


def _print_rows(rows: list[dict[str, Any]]) -> None:
    import pandas as pd  # on use: keeps `he2rna --help` from importing it

    keys = [
        "score",
        "truth",
        "n_tiles",
        "pearson_r",
        "pearson_p",
        "spearman_rho",
        "auc_p75",
        "auc_p90",
        "auc_p95",
        "auc_p99",
        "median_truth_top_n",
        "median_truth_all",
        "annotation_auc",
        "top_n_share_inside",
    ]
    df = pd.DataFrame(rows)
    df = df[[k for k in keys if k in df.columns]]
    with pd.option_context(
        "display.width", 160, "display.max_columns", 30, "display.float_format", "{:.4g}".format
    ):
        print(df.to_string(index=False))
    notes = [
        f"{r['score']} vs {r['truth']}: {r['note']}"
        for r in rows
        if isinstance(r.get("note"), str) and r["note"]
    ]
    for n in notes:
        print(f"note: {n}")


def run(args: argparse.Namespace) -> int:
    alignment = _alignment(args)
    common = {
        "cell_class": args.cell_class,
        "mask_mpp": args.mask_mpp,
        "mask_channel": args.mask_channel,
        "annotation_class": args.annotation_class,
        "negative_class": args.negative_class,
        "min_fraction": args.min_fraction,
        "alignment": alignment,
        "transform": _transform(args.transform),
        "columns": args.column,
        "percentiles": tuple(args.percentiles),
        "thresholds": tuple(args.threshold),
        "top_n": args.top_n,
        "spatial_null": args.spatial_null,
    }
    if args.manifest is not None:
        if args.transform is not None:
            raise DataError("with --manifest, give each slide's transform in a 'transform' column")
        return _run_manifest(args, common)
    if args.scores is None:
        raise DataError("give --scores TILE_SCORES.csv (or --manifest COHORT.csv)")
    tiles, metrics, rows = compare_one(
        args.scores,
        slide=args.slide,
        slide_size=args.slide_size,
        mpp=args.mpp,
        cells=args.cells,
        mask=args.mask,
        annotations=args.annotations,
        **common,
    )
    _atomic_csv(tiles, args.out / "tiles.csv", args.overwrite)
    _atomic_csv(metrics, args.out / "metrics.csv", args.overwrite)
    _print_rows(rows)
    print(f"per-tile table: {args.out / 'tiles.csv'}")
    print(f"metrics:        {args.out / 'metrics.csv'}")
    return 0


def _run_manifest(args: argparse.Namespace, common: dict[str, Any]) -> int:
    import pandas as pd  # on use: keeps `he2rna --help` from importing it

    from ..cohorts.cohort import slide_column
    from ..validation.metrics import summarize_slides

    path = args.manifest
    if not path.is_file() or path.stat().st_size == 0:
        raise DataError(f"the manifest {path} is missing or empty")
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    manifest = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    column = slide_column(manifest.columns, f"the manifest {path.name}", args.slide_column)
    if column is not None and column != "slide":
        manifest = manifest.rename(columns={"slide": "slide (not used)"}).rename(columns={column: "slide"})
    missing = [c for c in ("slide", "scores") if c not in manifest.columns]
    if missing:
        raise DataError(f"the manifest {path.name} lacks the column(s) {', '.join(missing)}")
    base = path.parent

    def p(value: str) -> Path | None:
        return None if _blank(value) else (base / value if not Path(value).is_absolute() else Path(value))

    def get(row: pd.Series, key: str, default: Any = None) -> Any:
        return row[key] if key in row and not _blank(row[key]) else default

    all_rows, long_parts = [], []
    for i, row in manifest.iterrows():
        name = Path(row["slide"]).stem or f"slide{i}"
        kw = dict(common)
        for key in ("cell_class", "annotation_class", "negative_class"):
            manifest_key = {"cell_class": "class"}.get(key, key)
            if get(row, manifest_key) is not None:
                kw[key] = [c.strip() for c in row[manifest_key].split("|")]
        if get(row, "mask_mpp") is not None:
            kw["mask_mpp"] = float(row["mask_mpp"])
        if get(row, "mask_channel") is not None:
            kw["mask_channel"] = row["mask_channel"]
        try:
            if get(row, "transform") is not None:
                kw["transform"] = _transform(p(row["transform"]))
        except DataError as exc:
            print(f"he2rna: error: slide {name}: {exc}", file=sys.stderr)
            all_rows.append({"slide": name, "note": f"error: {exc}"})
            continue
        try:
            tiles, metrics, rows = compare_one(
                p(row["scores"]),
                slide=p(row["slide"]),
                slide_size=(get(row, "width"), get(row, "height")) if get(row, "width") else None,
                mpp=float(row["mpp"]) if get(row, "mpp") else args.mpp,
                cells=p(get(row, "cells", "")),
                mask=p(get(row, "mask", "")),
                annotations=p(get(row, "annotations", "")),
                **kw,
            )
        except DataError as exc:  # one bad slide must not hide the others: say which and carry on
            print(f"he2rna: error: slide {name}: {exc}", file=sys.stderr)
            all_rows.append({"slide": name, "note": f"error: {exc}"})
            continue
        _atomic_csv(tiles, args.out / f"{name}_tiles.csv", args.overwrite)
        metrics.insert(0, "slide", name)
        long_parts.append(metrics)
        all_rows += [{"slide": name, **r} for r in rows]
    per_slide = pd.DataFrame(all_rows)
    ok = per_slide[
        ~per_slide.get("note", pd.Series("", index=per_slide.index)).astype(str).str.startswith("error")
    ]
    if ok.empty:
        raise DataError(f"no slide of {path.name} could be compared (see the errors above)")
    summary = summarize_slides(ok.drop(columns=[c for c in ("note",) if c in ok.columns]))
    out = pd.concat([per_slide, summary], ignore_index=True)
    _atomic_csv(out, args.out / "per_slide.csv", args.overwrite)
    _atomic_csv(pd.concat(long_parts, ignore_index=True), args.out / "metrics.csv", args.overwrite)
    _print_rows([r for r in out.to_dict("records") if isinstance(r.get("score"), str)])
    print(f"per slide: {args.out / 'per_slide.csv'} ({len(ok['slide'].unique())} slides + mean/median/sd)")
    return 0 if len(ok) == len(per_slide) else 2
