"""``he2rna convert``: turn PyTorch HE2RNA checkpoints (paper layout, SEQUOIA re-trainings) into a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert HE2RNA PyTorch checkpoints (paper layout, SEQUOIA he2rna-{cancer}-{fold}) to a bundle",
        description=(
            "Read one checkpoint, a folder of checkpoints (one per fold: *.pt, *.pth, *.bin, *.ckpt) or "
            "several files, with torch.load(weights_only=True) (no pickled code runs), map their 1x1 "
            "convolution or dense layers onto the HE2RNA MLP by order and shape, and write one .safetensors "
            "model bundle whose folds are averaged at inference. The gene names come from a text file, one "
            "per line, in the order of the model's outputs. A checkpoint of another architecture is refused."
        ),
    )
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint file(s), or one folder of them")
    p.add_argument("--genes", required=True, type=Path, help="text file: one gene name per line, in order")
    p.add_argument("--out", required=True, type=Path, help="model bundle to write (.safetensors)")
    p.add_argument(
        "--backbone",
        default="resnet50-imagenet",
        help="feature backbone the model was trained on (default resnet50-imagenet, as in the paper)",
    )
    p.add_argument("--tile-um", type=float, default=112.0, help="tile side in µm (default 112)")
    p.add_argument("--cancer-type", default=None, help="cohort the model was trained on (stored as metadata)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import DataError
    from ..model.bundle import convert_checkpoint, load_bundle

    if not args.genes.is_file():
        raise DataError(f"Gene list {args.genes} does not exist (one gene name per line, in output order).")
    out = args.out if args.out.suffix.lower() == ".safetensors" else args.out.with_suffix(".safetensors")
    if out.exists() and not args.overwrite:
        raise DataError(f"{out} exists; pass --overwrite to replace it.")
    src = args.checkpoints[0] if len(args.checkpoints) == 1 else list(args.checkpoints)
    meta = {"trained_on": f"converted checkpoint(s) ({args.cancer_type or 'cohort not stated'})"}
    if args.cancer_type:
        meta["cancer_type"] = args.cancer_type
    path = convert_checkpoint(
        src, out, args.genes, backbone=args.backbone, tile_um=args.tile_um, metadata=meta
    )
    bundle = load_bundle(path)  # proves the written file loads
    print(bundle.describe())
    print(f"model bundle: {path}")
    return 0
