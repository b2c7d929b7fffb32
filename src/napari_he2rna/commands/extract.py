"""``he2rna extract SLIDES... --out DIR``: tile features of a cohort, cached, one task per slide.

SLIDES are slide files, folders (their whole-slide and TIFF files), glob patterns, or a manifest CSV/TSV
with a slide column (``slide``, ``slide_path``, ``path``, ``file``, ``file_name``, ``filename``, ``wsi`` or
``image``, or the one ``--slide-column`` names; relative paths are relative to the manifest). Slides already
cached are skipped; a slide that fails, or a manifest row whose slide cell is empty, is reported on stderr
and the others go on; the exit code is 1 when any failed. A read-only cache folder is used when every slide
has a complete store there (nothing needs writing).

With ``--scheduler ADDRESS`` each slide is one task on a dask.distributed cluster; on SLURM, start one with
dask-jobqueue, e.g.::

    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(cores=8, memory="32GB", job_extra_directives=["--gres=gpu:1"])
    cluster.scale(jobs=4)
    print(cluster.scheduler_address)   # pass this to --scheduler

Workers need the package, the slides and the weights (file, snapshot folder or hub cache) at the same paths.
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

from ..errors import DataError
from ._common import add_cache_dir_argument, add_slide_column_argument

# Folders are searched for these only: a cohort folder also holds thumbnails, masks and tables.
FOLDER_SUFFIXES = (
    ".svs",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".bif",
    ".vms",
    ".vmu",
    ".svslide",
    ".tif",
    ".tiff",
    ".btf",
    ".tf8",
)
MANIFEST_SUFFIXES = (".csv", ".tsv")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "extract",
        help="extract and cache tile features of one or many slides",
        description=(
            "Tile the tissue of each slide into 112 µm squares and cache one feature vector per tile "
            "(zarr store per slide, backbone and tile size). Cached slides are skipped; failures are "
            "reported and the others go on."
        ),
    )
    parser.add_argument(
        "slides",
        nargs="+",
        metavar="SLIDES",
        help="slide files, folders, glob patterns or a manifest CSV/TSV with a slide column",
    )
    add_slide_column_argument(parser)
    # --cache-dir as in every command that reads these stores; --out was its name here before.
    add_cache_dir_argument(
        parser, help="where the feature stores go (default: $HE2RNA_CACHE, the feature cache)", old="--out"
    )
    parser.add_argument(
        "--backbone",
        default="resnet50-imagenet",
        help=(
            "feature extractor: resnet50-imagenet, hed-stats, a pathology foundation model (uni, "
            "uni2-h, h-optimus-0, h-optimus-1, virchow2, phikon, phikon-v2; pip install "
            "'napari-he2rna[foundation]'), a Hugging Face hub id (org/name) or a local snapshot folder"
        ),
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        metavar="PATH",
        help=(
            "a local weights file for the backbone (safetensors or a torch state dict), or a snapshot folder "
            "of a hub model (config.json + model.safetensors or pytorch_model.bin)"
        ),
    )
    parser.add_argument("--tile-um", type=float, default=112.0, help="tile side in µm (default 112)")
    parser.add_argument(
        "--min-tissue", type=float, default=0.5, help="smallest tissue fraction of a kept tile (default 0.5)"
    )
    parser.add_argument(
        "--max-tiles",
        type=int,
        default=8000,
        help="at most this many tiles per slide, sampled reproducibly (default 8000)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default auto)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help=(
            "autocast precision (default: bf16/fp16 on GPU; on CPU bf16 where it has AMX or AVX512-BF16, "
            "else fp32)"
        ),
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16"],
        help=(
            "what the stores keep: float16 halves their size and read time (training, spatialize, predict "
            "and the viewer read either; a backbone giving values beyond float16's ±65504 is refused with "
            "the slide named). Default: float32 for new stores, and a slide's existing store is kept in "
            "the dtype it has; naming one re-extracts the stores kept in the other (one store per slide)"
        ),
    )
    parser.add_argument("--batch-size", type=int, default=32, help="tiles per batch (halved on GPU OOM)")
    parser.add_argument("--workers", type=int, default=2, help="tile reader threads per slide (default 2)")
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="dask.distributed scheduler address: one task per slide on that cluster",
    )
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="pixel size in µm/px for slides that do not say it (overrides the files')",
    )
    parser.set_defaults(func=run)


# How a manifest's sample column is usually named (any case): it names the rows without a slide.
_SAMPLE_COLUMN_NAMES = ("sample_id", "sample", "sample id", "case_id", "id")


def _from_manifest(path: Path, slide_column_name: str | None = None) -> tuple[list[Path], list[str]]:
    """The slide paths of a manifest, and its rows whose slide cell is empty (``"m.csv row 3 (sample_id
    s2)"``, the header being row 1)."""
    import pandas as pd  # on use: keeps `he2rna --help` from importing it

    from ..cohorts.cohort import SLIDE_COLUMN_NAMES, resolve_slide_paths, slide_column

    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        table = pd.read_csv(path, sep=sep)
    except Exception as exc:
        raise DataError(f"cannot read the manifest {path}: {exc}.") from exc
    column = slide_column(table.columns, f"the manifest {path}", slide_column_name)
    if column is None:
        raise DataError(
            f"the manifest {path} has no slide column (columns: {', '.join(map(str, table.columns))}); "
            f"name it one of {', '.join(SLIDE_COLUMN_NAMES)} or pass --slide-column NAME."
        )
    cells = table[column]
    empty = [bool(pd.isna(v)) or not str(v).strip() for v in cells]
    others = [c for c in table.columns if c != column]
    named = [c for c in others if str(c).strip().lower() in _SAMPLE_COLUMN_NAMES] or others
    rows = []
    for i in (i for i, e in enumerate(empty) if e):
        sample = "" if not named or pd.isna(table[named[0]].iloc[i]) else str(table[named[0]].iloc[i]).strip()
        rows.append(f"{path.name} row {i + 2}" + (f" ({named[0]} {sample})" if sample else ""))
    kept = [str(v) for v, e in zip(cells, empty, strict=True) if not e]
    return [Path(p) for p in resolve_slide_paths(kept, path.parent)], rows


def expand_slides(items: list[str], slide_column_name: str | None = None) -> list[Path]:
    """Slide paths from files, folders, globs and manifests, in order, without duplicates.

    A manifest's slide column is ``slide_column_name`` or the one of the common names
    (:data:`napari_he2rna.cohorts.cohort.SLIDE_COLUMN_NAMES`) it has; its rows without a slide are left out
    (see
    :func:`collect_slides`, which names them).

    A name that is neither an existing path nor matches a glob is kept, so that it is reported as failed.
    """
    return collect_slides(items, slide_column_name)[0]


def collect_slides(items: list[str], slide_column_name: str | None = None) -> tuple[list[Path], list[str]]:
    """:func:`expand_slides`, and the manifest rows whose slide cell is empty, named by file, row (the
    header is row 1) and sample (``"m.csv row 3 (sample_id s2)"``)."""
    out: list[Path] = []
    empty: list[str] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)
        elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
            paths, rows = _from_manifest(path, slide_column_name)
            out += paths
            empty += rows
        elif path.exists():
            out.append(path)
        elif glob.has_magic(item):
            out += [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        else:
            out.append(path)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve() if p.exists() else p
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, empty


def _print_result(r: dict) -> None:
    if r["status"] == "failed":
        print(f"he2rna: {r['slide']}: failed: {r['reason']}", file=sys.stderr, flush=True)
    else:
        print(f"{r['status']:>6}  {r['n_tiles']:>5} tiles  {r['slide']}  ->  {r['store']}", flush=True)


def _empty_row(row: str) -> dict:
    return {"slide": row, "status": "failed", "reason": "its slide cell is empty; fill it or remove the row."}


def _require_stores(slides: list[Path], backbone, options, cache_dir: Path, mpp, refused) -> None:
    """In a cache folder that cannot be written, go on only when every slide has a sound store there;
    else raise ``refused`` (the folder's sentence) with how many have none. Unreadable slides are left to
    the run, which reports them."""
    from ..features.cache import is_cached
    from ..slides.slide import open_slide

    missing = []
    for path in slides:
        try:
            with open_slide(path, mpp=mpp) as slide:
                if not is_cached(slide, backbone, options, cache_dir=cache_dir):
                    missing.append(path.name)
        except Exception:  # noqa: BLE001 - reported per slide by the run
            continue
    if missing:
        raise type(refused)(
            f"{str(refused).rstrip('.')} ({len(missing)} of {len(slides)} slides have no complete store "
            f"there, e.g. {missing[0]})."
        )


def run(args: argparse.Namespace) -> int:
    from .. import settings
    from ..features.backbones import backbone_info, get_backbone
    from ..features.cohort_tasks import extract_cohort
    from ..features.extraction import ExtractOptions
    from ..jobs import TextProgress
    from ..safe_output import OutputError, prepare_folder
    from ..slides.slide import validate_mpp
    from ..slides.tiling import check_tile_size

    slides, empty_rows = collect_slides(args.slides, args.slide_column)
    if not slides:
        raise DataError(
            f"no slides found in {' '.join(args.slides)}"
            + (f" (every slide cell of the manifest is empty, e.g. {empty_rows[0]})." if empty_rows else ".")
        )
    backbone_info(args.backbone)  # an unknown name fails before any slide is opened
    check_tile_size(args.tile_um)  # absurd sizes fail once, here, rather than once per slide
    if args.mpp is not None:
        validate_mpp(args.mpp)
    cache_dir = Path(args.cache_dir) if args.cache_dir is not None else settings.cache_dir()
    read_only = None
    if args.scheduler is None:  # on a cluster the folder is the workers' to make
        try:
            prepare_folder(cache_dir, "feature store folder")
        except OutputError as exc:
            if not cache_dir.expanduser().is_dir():
                raise
            read_only = exc  # complete stores can still be read there: checked below, slide by slide
    backbone = None
    if args.scheduler is None:
        # Fail once, clearly, when the weights are missing rather than once per slide; then use it.
        backbone = get_backbone(args.backbone, weights=args.weights, device=args.device)
    progress = TextProgress(f"extract ({args.backbone})") if sys.stderr.isatty() else None
    options = ExtractOptions(
        backbone=args.backbone,
        weights=args.weights,
        tile_um=args.tile_um,
        min_tissue=args.min_tissue,
        max_tiles=args.max_tiles,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        num_workers=args.workers,
        dtype=args.dtype,
    )
    if read_only is not None:
        _require_stores(slides, backbone, options, cache_dir, args.mpp, read_only)
    skipped = [_empty_row(row) for row in empty_rows]
    for r in skipped:
        _print_result(r)
    results = extract_cohort(
        slides,
        backbone,
        out_dir=Path(args.cache_dir) if args.cache_dir is not None else None,
        scheduler=args.scheduler,
        options=options,
        mpp=args.mpp,
        progress=progress,
        on_result=_print_result,  # each slide's line as it finishes: a killed run's log is not empty
    )
    failed = sum(r["status"] == "failed" for r in results) + len(skipped)
    ok = len(results) + len(skipped) - failed
    print(
        f"{ok} of {len(results) + len(skipped)} slides have features"
        + (f"; {failed} failed" if failed else "")
        + "."
    )
    return 1 if failed else 0
