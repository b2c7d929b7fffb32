"""Benchmark: reading a level with a non-integer downsample, OpenSlide vs the native TIFF tiles, same run.

Builds two-level pyramids of real H&E (the CMU region, mirror-tiled) with a real TCGA frozen slide's odd
sizes, 4443 x 3567 -> 2221 x 1783 (downsample 2.0005), as Aperio SVS in JPEG and in JPEG 2000 (33005), then
for each level reads every 480 px tile-aligned window of unseen tiles (fresh handles) with OpenSlide's
``read_region`` (level-0 coordinates) and with :class:`napari_he2rna.slides.native_tiles.NativeTiles`, and
reports the seconds and the largest difference of each to the level read from its origin. Run::

    python benchmarks/bench_levels.py

Results go to ``benchmarks/results/levels.md``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image

from napari_he2rna.slides.native_tiles import NativeTiles

ROOT = Path(__file__).resolve().parents[1]
CMU = ROOT.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs"
SIZES = ((4443, 3567), (2221, 1783))


def make(path: Path, compression) -> Path:
    with openslide.OpenSlide(str(CMU)) as src:
        patch = np.asarray(src.read_region((0, 0), 0, src.dimensions).convert("RGB"))
    block = np.concatenate([patch, patch[:, ::-1]], axis=1)
    block = np.concatenate([block, block[::-1]], axis=0)
    level0 = np.ascontiguousarray(np.tile(block, (2, 2, 1))[: SIZES[0][1], : SIZES[0][0]])
    level1 = np.asarray(Image.fromarray(level0).resize(SIZES[1], Image.Resampling.BILINEAR))
    desc = "Aperio Image Library v10.0.0\r\n4443x3567 [0,0 4443x3567] (240x240)|AppMag = 20|MPP = 0.499"
    with tifffile.TiffWriter(path) as tw:
        for i, image in enumerate((level0, level1)):
            tw.write(
                image,
                tile=(240, 240),
                photometric="rgb",
                compression=compression,
                subfiletype=int(i > 0),
                description=desc if i == 0 else "Aperio Image Library v10.0.0",
                metadata=None,
            )
    return path


def main() -> None:
    lines = [
        "Level reads on a 4443x3567 + 2221x1783 Aperio pyramid (downsample 2.0005), 480 px windows of unseen",
        "tiles, fresh handles; max |diff| to the level read from its origin. Shared 2-core machine: compare",
        "columns within one run.",
        "",
        "| codec | level | windows | OpenSlide s | native s | native / OpenSlide | OpenSlide max diff | "
        "native max diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for codec, compression in (("JPEG", "jpeg"), ("JPEG 2000", 33005)):
            path = make(Path(tmp) / f"odd-{compression}.svs", compression)
            for level in (0, 1):
                ref = openslide.OpenSlide(str(path))
                w, h = ref.level_dimensions[level]
                ds = ref.level_downsamples[level]
                whole = np.asarray(ref.read_region((0, 0), level, (w, h)).convert("RGB")).astype(np.int16)
                ref.close()
                windows = [(x, y) for y in range(0, h - 480, 480) for x in range(0, w - 480, 480)]
                diffs = {"openslide": 0, "native": 0}
                with openslide.OpenSlide(str(path)) as osr:
                    t = time.perf_counter()
                    for x, y in windows:
                        got = np.asarray(osr.read_region((round(x * ds), round(y * ds)), level, (480, 480)))
                        d = np.abs(got[..., :3].astype(np.int16) - whole[y : y + 480, x : x + 480]).max()
                        diffs["openslide"] = max(diffs["openslide"], int(d))
                    t_os = time.perf_counter() - t
                native = NativeTiles(path, list(SIZES), (255, 255, 255))
                t = time.perf_counter()
                for x, y in windows:
                    got = native.read(level, (x, y), (480, 480))
                    d = np.abs(got.astype(np.int16) - whole[y : y + 480, x : x + 480]).max()
                    diffs["native"] = max(diffs["native"], int(d))
                t_nt = time.perf_counter() - t
                native.close()
                lines.append(
                    f"| {codec} | {level} | {len(windows)} | {t_os:.2f} | {t_nt:.2f} | {t_nt / t_os:.2f} | "
                    f"{diffs['openslide']} | {diffs['native']} |"
                )
    out = ROOT / "benchmarks" / "results" / "levels.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
