"""slide.py on real slides: pixels equal OpenSlide's, pixel size, laziness, bad input, OME-TIFF, CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from napari_he2rna import cli
from napari_he2rna.errors import MissingMPPError, SlideError
from napari_he2rna.slides.slide import PYRAMID_MIN_SIDE, Slide, open_slide


def _openslide_rgb(path: Path, location, level, size) -> np.ndarray:
    """OpenSlide's own read_region, RGBA composited on white: the reference the pyramid must match."""
    with openslide.OpenSlide(str(path)) as ref:
        rgba = np.asarray(ref.read_region(location, level, size)).astype(np.float64)
    alpha = rgba[..., 3:] / 255.0
    return np.round(rgba[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)


def _count_reads(slide: Slide) -> list:
    """Wrap the slide's backend so every level read is recorded as (location in level px, level, size)."""
    calls: list = []
    inner = slide._backend.read_level

    def read_level(location, level, size):
        calls.append((location, level, size))
        return inner(location, level, size)

    slide._backend.read_level = read_level
    return calls


def _window(whole: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """``whole[y:y+h, x:x+w]``, padded with white where the window leaves the image."""
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    part = whole[y : y + h, x : x + w]
    out[: part.shape[0], : part.shape[1]] = part
    return out


OPENSLIDE_FILES = {
    # name: (dimensions, level_count, mpp, vendor)
    "cmu-1-small-region.svs": ((2220, 2967), 1, 0.499, "aperio"),
    "openslide-fixtures/small.svs": ((16, 16), 1, 0.499, "aperio"),
    "openslide-fixtures/boxes.tiff": ((300, 250), 4, None, "generic-tiff"),
    "openslide-fixtures/boxes_0.dcm": ((16, 16), 1, 0.499, "dicom"),
}


@pytest.mark.parametrize("name", sorted(OPENSLIDE_FILES))
def test_facts_and_pyramid_match_openslide(shared_data, name):
    path = shared_data / "slides" / name
    dims, n_levels, mpp, vendor = OPENSLIDE_FILES[name]
    with open_slide(path) as slide:
        assert slide.dimensions == dims
        assert slide.level_count == n_levels
        assert slide.vendor == vendor
        assert slide.mpp == pytest.approx(mpp) if mpp else slide.mpp is None
        with openslide.OpenSlide(str(path)) as ref:
            assert slide.level_dimensions == list(ref.level_dimensions)
            assert slide.level_downsamples == pytest.approx(list(ref.level_downsamples))
        pyramid = slide.pyramid()
        assert all(level.dtype == np.uint8 and level.shape[2] == 3 for level in pyramid)
        for level in range(slide.level_count):
            w, h = slide.level_dimensions[level]
            assert pyramid[level].shape == (h, w, 3)
            # OpenSlide's whole level read from its origin: exact level pixels (a read starting elsewhere on a
            # level with a fractional downsample, like boxes.tiff's 4.016, is resampled by OpenSlide, which
            # the pyramid and read_region must not be)
            whole = _openslide_rgb(path, (0, 0), level, (w, h))
            # windows inside one chunk, across chunk borders, and the far corner
            for x, y, ww, hh in [
                (0, 0, min(w, 64), min(h, 48)),
                (w // 3, h // 4, min(w - w // 3, 700), 40),
                (max(w - 33, 0), max(h - 21, 0), min(w, 33), min(h, 21)),
            ]:
                got = pyramid[level][y : y + hh, x : x + ww].compute()
                np.testing.assert_array_equal(
                    got, whole[y : y + hh, x : x + ww], err_msg=f"{name} L{level} ({x},{y})"
                )
                np.testing.assert_array_equal(
                    slide.read_level_region((x, y), level, (ww, hh)), _window(whole, x, y, ww, hh)
                )
                # a level-0 location reads the level's own pixels from the nearest level position
                ds = slide.level_downsamples[level]
                loc = (round(x * ds) + 1, round(y * ds) - 1 if y else 0)
                at = (round(loc[0] / ds), round(loc[1] / ds))
                got = slide.read_region(loc, level, (ww, hh))
                np.testing.assert_array_equal(got, _window(whole, *at, ww, hh))


def test_cmu_pyramid_is_padded_by_coarsening(cmu_slide):
    with open_slide(cmu_slide) as slide:
        pyramid = slide.pyramid()
        # one native level of 2967 px is padded down to <= PYRAMID_MIN_SIDE by halving
        assert [p.shape for p in pyramid] == [(2967, 2220, 3), (1483, 1110, 3)]
        assert slide.pyramid_downsamples == [1.0, 2.0]
        assert max(pyramid[-1].shape[:2]) <= PYRAMID_MIN_SIDE
        # chunks follow the slide's 240 px tile grid
        assert pyramid[0].chunks[0][0] % 240 == 0 and 512 <= pyramid[0].chunks[0][0] <= 1024
        full = slide.read_region((0, 400), 0, (2220, 200)).astype(np.float64)
        want = full.reshape(100, 2, 1110, 2, 3).mean(axis=(1, 3))
        got = pyramid[1][200:300].compute().astype(np.float64)
        assert np.abs(got - want).max() <= 0.5 + 1e-9


def test_pyramid_is_lazy(cmu_slide):
    with open_slide(cmu_slide) as slide:
        calls = _count_reads(slide)
        pyramid = slide.pyramid()
        assert calls == []  # building the pyramid reads nothing
        chunk = pyramid[0].chunks[0][0]
        block = pyramid[0].blocks[1, 1].compute()
        assert block.shape == (chunk, chunk, 3)
        assert calls == [((chunk, chunk), 0, (chunk, chunk))]  # exactly that chunk, through one read
        calls.clear()
        # a viewport reads only what it shows (dask fuses the slice into the chunk's read), in one read
        pyramid[0][10:20, 15:40].compute()
        assert calls == [((15, 10), 0, (25, 10))]
        calls.clear()
        # across a chunk border: one read of the whole viewport (its tiles decode on several threads)
        got = pyramid[0][chunk - 5 : chunk + 7, 3:9].compute()
        assert calls == [((3, chunk - 5), 0, (6, 12))]
        np.testing.assert_array_equal(got, slide.read_level_region((3, chunk - 5), 0, (6, 12)))
        calls.clear()
        # dask's own slicing (what a level read by one thread gets): one read per chunk
        got = pyramid[0].chunked()[chunk - 5 : chunk + 7, 3:9].compute()
        assert sorted(calls) == [((3, chunk - 5), 0, (6, 5)), ((3, chunk), 0, (6, 7))]
        np.testing.assert_array_equal(got, slide.read_level_region((3, chunk - 5), 0, (6, 12)))


def test_thumbnail_and_fingerprint(cmu_slide, tmp_path):
    with open_slide(cmu_slide) as slide:
        thumb = slide.thumbnail(512)
        assert thumb.shape == (512, round(2220 * 512 / 2967), 3) and thumb.dtype == np.uint8
        assert thumb.std() > 10  # real tissue, not a blank image
        fp = slide.fingerprint()
    copy = tmp_path / "renamed-copy.svs"
    shutil.copy(cmu_slide, copy)
    with open_slide(copy) as slide:
        assert slide.fingerprint() == fp  # independent of name and mtime
    with open_slide(cmu_slide.parent / "openslide-fixtures" / "small.svs") as other:
        assert other.fingerprint() != fp


def test_png_opens_as_single_level_image(shared_data):
    path = shared_data / "slides" / "openslide-fixtures" / "boxes.png"
    with open_slide(path) as slide:
        assert slide.vendor == "image" and slide.level_count == 1
        want = np.asarray(Image.open(path).convert("RGBA"))
        alpha = want[..., 3:] / 255.0
        want = np.round(want[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
        np.testing.assert_array_equal(slide.pyramid()[0].compute(), want)
        out = slide.read_region((290, 240), 0, (20, 20))  # outside the image is white
        np.testing.assert_array_equal(out[:10, :10], want[240:, 290:])
        assert (out[10:, 10:] == 255).all()
        with pytest.raises(MissingMPPError, match="--mpp"):
            slide.require_mpp()


def test_missing_mpp_and_override(shared_data, cmu_slide):
    boxes = shared_data / "slides" / "openslide-fixtures" / "boxes.tiff"
    with open_slide(boxes) as slide:
        # the file's 72 dpi (352.8 µm/px) is an image editor's default, not a pixel size
        assert slide.mpp is None
        with pytest.raises(MissingMPPError, match=r"--mpp.*µm/px field"):
            slide.require_mpp()
    with open_slide(boxes, mpp=0.25) as slide:
        assert slide.require_mpp() == 0.25
    with open_slide(cmu_slide, mpp=0.5) as slide:
        assert slide.mpp == 0.5
        slide.mpp = 0.3
        assert slide.require_mpp() == 0.3
    with pytest.raises(SlideError, match="positive number"):
        open_slide(cmu_slide, mpp=-1)


def test_read_region_outside_and_errors(cmu_slide):
    with open_slide(cmu_slide) as slide:
        out = slide.read_region((2200, 2950), 0, (40, 30))
        assert out.shape == (30, 40, 3)
        assert (out[17:, :] == 255).all() and (out[:, 20:] == 255).all()  # composited on white, not black
        assert slide.get_best_level_for_downsample(8) == 0
        with pytest.raises(SlideError, match="Level 3 does not exist"):
            slide.read_region((0, 0), 3, (10, 10))
        level = slide.pyramid()[0]
    with pytest.raises(SlideError, match="closed"):
        level[:10, :10].compute()


def test_best_level_for_downsample(shared_data):
    with open_slide(shared_data / "slides" / "openslide-fixtures" / "boxes.tiff") as slide:
        assert [slide.get_best_level_for_downsample(d) for d in (1, 1.9, 2, 4.5, 100)] == [0, 0, 1, 2, 3]


@pytest.fixture
def bad_files(tmp_path, cmu_slide, shared_data) -> dict[str, Path]:
    files = {}
    files["empty"] = tmp_path / "empty.svs"
    files["empty"].write_bytes(b"")
    data = cmu_slide.read_bytes()
    for frac in (0.3, 0.9):
        files[f"truncated{frac}"] = tmp_path / f"truncated{frac}.svs"
        files[f"truncated{frac}"].write_bytes(data[: int(len(data) * frac)])
    files["png-as-svs"] = tmp_path / "boxes.svs"
    shutil.copy(shared_data / "slides" / "openslide-fixtures" / "boxes.png", files["png-as-svs"])
    files["random"] = tmp_path / "noise.ndpi"
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["folder"] = tmp_path / "a_folder.svs"
    files["folder"].mkdir()
    files["missing"] = tmp_path / "missing.svs"
    files["text"] = tmp_path / "notes.tif"
    files["text"].write_text("not an image at all\n")
    return files


BAD_MESSAGES = {
    "empty": r"empty\.svs is empty \(0 bytes\)",
    "truncated0.3": r"truncated0\.3\.svs is truncated or damaged",
    "truncated0.9": r"truncated0\.9\.svs is truncated or damaged",
    "png-as-svs": r"boxes\.svs is a PNG image, not a whole-slide image; rename it to \.png",
    "random": r"noise\.ndpi is not a slide this plugin can open",
    "folder": r"a_folder\.svs is a folder, not a slide file",
    "missing": r"No such file: .*missing\.svs",
    "text": r"notes\.tif is not a slide this plugin can open",
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_bad_input_gives_one_clear_sentence(bad_files, case):
    with pytest.raises(SlideError, match=BAD_MESSAGES[case]) as info:
        open_slide(bad_files[case])
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message and "Traceback" not in message


@pytest.fixture
def ome_tiff(tmp_path) -> tuple[Path, np.ndarray]:
    """A 3-level OME-TIFF pyramid in SubIFDs (which OpenSlide ignores), 0.25 µm/px in OME metadata only."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    image = np.kron(base, np.ones((16, 16, 1), dtype=np.uint8))  # 1024 x 1536 with structure to compare
    path = tmp_path / "pyramid.ome.tiff"
    opts = dict(tile=(256, 256), photometric="rgb", compression="zlib")
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            image,
            subifds=2,
            metadata={
                "axes": "YXS",
                "PhysicalSizeX": 0.25,
                "PhysicalSizeY": 0.25,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeYUnit": "µm",
            },
            **opts,
        )
        tw.write(image[::2, ::2], subfiletype=1, **opts)
        tw.write(image[::4, ::4], subfiletype=1, **opts)
    return path, image


def test_ome_tiff_opens_through_tifffile(ome_tiff):
    path, image = ome_tiff
    with open_slide(path) as slide:
        assert slide.vendor == "ome-tiff"
        assert slide.mpp == pytest.approx(0.25)
        assert slide.level_dimensions == [(1536, 1024), (768, 512), (384, 256)]
        assert slide.level_downsamples == [1.0, 2.0, 4.0]
        pyramid = slide.pyramid()
        assert len(pyramid) == 3
        np.testing.assert_array_equal(pyramid[0][100:700, 300:1400].compute(), image[100:700, 300:1400])
        np.testing.assert_array_equal(pyramid[2].compute(), image[::4, ::4])
        np.testing.assert_array_equal(
            slide.read_region((400, 200), 1, (100, 50)), image[::2, ::2][100:150, 200:300]
        )
        calls = _count_reads(slide)
        slide.pyramid()[0].blocks[0, 0].compute()
        assert len(calls) == 1


def test_tiff_resolution_tags_give_mpp(tmp_path):
    """A striped (untiled) TIFF OpenSlide refuses, with its pixel size in centimetre resolution tags."""
    path = tmp_path / "striped.tif"
    image = np.full((300, 200, 3), 200, dtype=np.uint8)
    tifffile.imwrite(
        path, image, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER"
    )
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert slide.dimensions == (200, 300)
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (200, 300)), image)


def test_info_cli(cmu_slide, shared_data, tmp_path, capsys):
    out_png = tmp_path / "thumb.png"
    assert cli.main(["info", str(cmu_slide), "--thumbnail", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "aperio" in text and "2220 x 2967" in text and "0.499" in text and "20x" in text
    thumb = np.asarray(Image.open(out_png))
    assert thumb.ndim == 3 and max(thumb.shape[:2]) <= 1024 and thumb.std() > 10

    boxes = shared_data / "slides" / "openslide-fixtures" / "boxes.tiff"
    assert cli.main(["info", str(boxes)]) == 0
    captured = capsys.readouterr()
    assert "unknown" in captured.out and "--mpp" in captured.err
    assert cli.main(["info", str(boxes), "--mpp", "0.5"]) == 0
    assert "0.5" in capsys.readouterr().out

    assert cli.main(["info", str(tmp_path / "nope.svs")]) == 2
    err = capsys.readouterr().err
    assert "No such file" in err and "Traceback" not in err


# ------------------------------------------------------------ odd-sized pyramids (non-integer downsample)
ODD_SIZE = (4443, 3567)  # a real TCGA frozen section's level 0; level 1 is 2221 x 1783, downsample 2.0005
APERIO_DESCRIPTION = (
    "Aperio Image Library v10.0.0\r\n4443x3567 [0,0 4443x3567] (240x240) {codec}|AppMag = 20|MPP = 0.499"
)


def _odd_pyramid(path: Path, cmu_slide: Path, compression, description: str | None = None) -> Path:
    """A two-level tiled TIFF of real H&E (mirror-tiled CMU region) with odd level sizes, 240 px tiles."""
    with openslide.OpenSlide(str(cmu_slide)) as src:
        patch = np.asarray(src.read_region((0, 0), 0, src.dimensions).convert("RGB"))
    block = np.concatenate([patch, patch[:, ::-1]], axis=1)
    block = np.concatenate([block, block[::-1]], axis=0)
    width, height = ODD_SIZE
    level0 = np.ascontiguousarray(np.tile(block, (2, 2, 1))[:height, :width])
    level1 = np.asarray(Image.fromarray(level0).resize((2221, 1783), Image.Resampling.BILINEAR))
    with tifffile.TiffWriter(path) as tw:
        for i, image in enumerate((level0, level1)):
            tw.write(
                image,
                tile=(240, 240),
                photometric="rgb",
                compression=compression,
                subfiletype=0 if i == 0 else 1,
                description=(description if i == 0 else "Aperio Image Library v10.0.0")
                if description
                else None,
                resolution=(20040, 20040),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    return path


@pytest.fixture(scope="module")
def odd_slides(tmp_path_factory, shared_data) -> dict[str, Path]:
    cmu = shared_data / "slides" / "cmu-1-small-region.svs"
    root = tmp_path_factory.mktemp("odd")
    return {
        "generic-tiff": _odd_pyramid(root / "odd.tiff", cmu, "jpeg"),
        "aperio-jpeg": _odd_pyramid(
            root / "odd.svs", cmu, "jpeg", APERIO_DESCRIPTION.format(codec="JPEG/RGB Q=90")
        ),
        "aperio-jp2k": _odd_pyramid(
            root / "odd-jp2k.svs", cmu, 33005, APERIO_DESCRIPTION.format(codec="J2K/KDU Q=70")
        ),
    }


@pytest.mark.parametrize("kind", ["generic-tiff", "aperio-jpeg", "aperio-jp2k"])
def test_odd_sized_levels_are_the_levels_own_pixels(odd_slides, kind):
    path = odd_slides[kind]
    with openslide.OpenSlide(str(path)) as ref:
        assert ref.level_dimensions == (ODD_SIZE, (2221, 1783))
        ds = ref.level_downsamples[1]
        assert ds == pytest.approx(2.0005, abs=1e-4)
        whole = np.asarray(ref.read_region((0, 0), 1, ref.level_dimensions[1]).convert("RGB")).astype(
            np.int16
        )
        # the flaw being fixed: OpenSlide's read of a chunk through level-0 coordinates is resampled
        shifted = np.asarray(ref.read_region((round(480 * ds), round(480 * ds)), 1, (96, 96)).convert("RGB"))
        assert np.abs(shifted.astype(np.int16) - whole[480:576, 480:576]).max() > 2
    with open_slide(path) as slide:
        assert slide.vendor == ("aperio" if kind.startswith("aperio") else kind)
        level = slide.pyramid()[1]
        assert level.shape == (1783, 2221, 3)
        worst = 0
        for i in range(level.numblocks[0]):
            for j in range(level.numblocks[1]):
                y0, x0 = sum(level.chunks[0][:i]), sum(level.chunks[1][:j])
                block = level.blocks[i, j].compute().astype(np.int16)
                want = whole[y0 : y0 + block.shape[0], x0 : x0 + block.shape[1]]
                worst = max(worst, int(np.abs(block - want).max()))
        assert worst <= 2, f"level 1 chunks differ from the level's pixels by up to {worst}"
        threaded = level.compute(scheduler="threads", num_workers=4).astype(np.int16)  # concurrent reads
        assert np.abs(threaded - whole).max() <= 2
        # a tile read at level-0 coordinates lands on the nearest level pixel, not between two
        loc = (2003, 1555)  # level positions 1001.25 and 777.30
        x, y = round(loc[0] / ds), round(loc[1] / ds)
        assert (x, y) == (1001, 777)
        tile = slide.read_region(loc, 1, (112, 112)).astype(np.int16)
        assert np.abs(tile - whole[y : y + 112, x : x + 112]).max() <= 2


def test_damaged_tile_is_named_not_black(odd_slides, tmp_path):
    path = tmp_path / "damaged.tiff"
    shutil.copy(odd_slides["generic-tiff"], path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[1]
        across = -(-page.imagewidth // 240)
        index = 3 * across + 4  # the tile at (960, 720) px of level 1
        offset = page.dataoffsets[index]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * 64)  # its JPEG header is gone
    with open_slide(path) as slide:
        assert slide.read_level_region((0, 0), 1, (240, 240)).shape == (240, 240, 3)  # other tiles still read
        with pytest.raises(SlideError) as err:
            slide.pyramid()[1][700:800, 950:1000].compute()
    message = str(err.value)
    assert "level 1" in message and "(960, 720)" in message
    assert message.endswith(".") and "\n" not in message
