"""``he2rna convert``: turn published HE2RNA weights (paper-layout checkpoints, SEQUOIA's snapshot folders or
hub ids) into a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

#: Kept in step with napari_he2rna.model.convert (not imported: building the parser loads no torch).
PRESET_NAMES = ("sequoia-he2rna",)
DEFAULT_UNIT = "log10(1+FPKM-UQ)"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert published HE2RNA weights (checkpoints, SEQUOIA snapshots, hub ids) to a bundle",
        description=(
            "Read HE2RNA weights, one source per fold: PyTorch checkpoints (*.pt, *.pth, *.bin, *.ckpt; read "
            "with torch.load(weights_only=True), no pickled code runs), snapshot folders in the "
            "PyTorchModelHubMixin layout (model.safetensors + optional config.json, as the SEQUOIA authors "
            "published gevaertlab/he2rna-{cancer}-{fold}), a folder of either, or hub ids such as "
            "gevaertlab/he2rna-brca-0 (several ids: the folds of one ensemble; fetched into the Hugging Face "
            "cache, offline with HF_HUB_OFFLINE=1 or HE2RNA_OFFLINE=1). Their 1x1 convolution or dense layers"
            " are mapped onto the HE2RNA MLP and written as one .safetensors model bundle whose folds are "
            "averaged at inference. The gene names come from a text file (one per line) or a CSV/TSV with a "
            "gene (or symbol) column, in the order of the model's outputs. --preset sequoia-he2rna records "
            "SEQUOIA's preprocessing (256 px tiles at 20x fed without resizing, ResNet50-ImageNet features, "
            "per slide the means of 100 k-means clusters, k in 1 2 5 10 20 50 100)."
        ),
    )
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="checkpoint file, snapshot folder, folder of either, or hub id (org/name); one per fold",
    )
    p.add_argument(
        "--genes",
        required=True,
        type=Path,
        help="gene list in output order: one name per line, or a CSV/TSV with a gene (or symbol) column",
    )
    p.add_argument("--out", required=True, type=Path, help="model bundle to write (.safetensors)")
    p.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default=None,
        help="record the preprocessing the weights were trained with (sequoia-he2rna: 256 px tiles at 20x, "
        "no resize, resnet50-imagenet, k-means 100 clusters, k in 1 2 5 10 20 50 100); options given "
        "explicitly win",
    )
    p.add_argument(
        "--backbone",
        default=None,
        help="feature backbone the model was trained on (default resnet50-imagenet, as in the paper)",
    )
    p.add_argument(
        "--tile-um", type=float, default=None, help="tile side in µm (default 112, or from --tile-px)"
    )
    p.add_argument("--tile-px", type=int, default=None, help="tile side in pixels at --magnification")
    p.add_argument("--magnification", type=float, default=None, help="objective magnification of --tile-px")
    p.add_argument(
        "--no-resize",
        dest="input_resize",
        action="store_const",
        const=False,
        default=None,
        help="the backbone was fed each tile at its own pixel size (not resized to its input side)",
    )
    p.add_argument(
        "--aggregation",
        choices=("topk", "kmeans"),
        default=None,
        help="slide input: the tiles (topk, HE2RNA) or the means of k-means clusters of the tile features "
        "(kmeans, SEQUOIA)",
    )
    p.add_argument("--clusters", type=int, default=None, help="k-means clusters per slide (default 100)")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="k list averaged at inference")
    p.add_argument(
        "--unit", default=None, help=f"what the outputs are in, shown with the maps (default {DEFAULT_UNIT})"
    )
    p.add_argument("--cancer-type", default=None, help="cohort the model was trained on (stored as metadata)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import DataError
    from ..model.aggregation import Clustering
    from ..model.bundle import load_bundle
    from ..model.convert import convert_checkpoint

    if not args.genes.is_file():
        raise DataError(f"Gene list {args.genes} does not exist (one gene name per line, in output order).")
    out = args.out if args.out.suffix.lower() == ".safetensors" else args.out.with_suffix(".safetensors")
    if out.exists() and not args.overwrite:
        raise DataError(f"{out} exists; pass --overwrite to replace it.")
    src = args.sources[0] if len(args.sources) == 1 else list(args.sources)
    meta = {"trained_on": f"converted checkpoint(s) ({args.cancer_type or 'cohort not stated'})"}
    if args.cancer_type:
        meta["cancer_type"] = args.cancer_type
    path = convert_checkpoint(
        src,
        out,
        args.genes,
        backbone=args.backbone,
        tile_um=args.tile_um,
        ks=args.ks,
        metadata=meta,
        preset=args.preset,
        unit=args.unit,
        aggregation=args.aggregation,
        tile_px=args.tile_px,
        tile_magnification=args.magnification,
        input_resize=args.input_resize,
        clustering=Clustering(n_clusters=args.clusters) if args.clusters is not None else None,
    )
    bundle = load_bundle(path)  # proves the written file loads
    print(bundle.describe())
    print(f"model bundle: {path}")
    return 0
