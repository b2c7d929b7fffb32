"""The readers behind a :class:`~.slide.Slide`, and the choice of one for a file (:func:`open_backend`).

- **OpenSlide** (openslide-python with the openslide-bin wheel) for everything OpenSlide reads: Aperio .svs,
  Hamamatsu .ndpi/.vms/.vmu, MIRAX .mrxs, Leica .scn, Ventana .bif, Philips TIFF, DICOM WSI, generic tiled
  TIFF. For Aperio and generic TIFF the pixels come from the TIFF tiles themselves
  (:class:`~.native_tiles.NativeTiles`).
- **tifffile** (+ its zarr store) for OME-TIFF (whose reduced levels live in SubIFDs, which OpenSlide ignores)
  and for TIFFs OpenSlide refuses (e.g. striped, not tiled).
- **Pillow** for small plain images (PNG, JPEG), as a single level.

Every backend returns ``uint8`` RGB composited onto white (or the slide's own background colour).

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError
from .native_tiles import NATIVE_TOLERANCE, NATIVE_VENDORS, NativeTiles
from .pixels import composite, paint

__all__ = [
    "Backend",
    "open_backend",
    "WSI_SUFFIXES",
    "MAX_PLAIN_IMAGE_PIXELS",
    "PLAUSIBLE_MPP",
    "positive_float",
    "plausible_mpp",
]

# Suffixes that promise a whole-slide image: a plain image under one of these names is a mistake to report.
WSI_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".dcm", ".vms", ".vmu", ".svslide", ".tf8", ".btf")

# Plain images are read whole into memory; beyond Pillow's own decompression-bomb limit (~9.5k px square)
# they must be converted to a tiled pyramid.
MAX_PLAIN_IMAGE_PIXELS = 89_478_485
# Pixel sizes outside this range (µm/px) are not microscope pixel sizes: typically an image editor's default
# 72 or 96 dpi written into the TIFF/PNG resolution tags. Using them would be a silent guess, so they are
# treated as missing (the user is asked for the pixel size instead).
PLAUSIBLE_MPP = (0.01, 100.0)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_MAGIC_NAMES = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF87a": "a GIF image",
    b"GIF89a": "a GIF image",
    b"BM": "a BMP image",
    b"PK\x03\x04": "a ZIP archive",
    b"%PDF": "a PDF document",
    b"\x1f\x8b": "a gzip archive",
}
_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- helpers
def _sniff(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(16)


def _magic_name(head: bytes) -> str | None:
    for magic, name in _MAGIC_NAMES.items():
        if head.startswith(magic):
            return name
    return None


def _parse_background(props: dict[str, str]) -> tuple[int, int, int]:
    """OpenSlide's ``openslide.background-color`` (``RRGGBB`` hex) or white."""
    text = props.get("openslide.background-color", "")
    try:
        value = int(text, 16)
        return ((value >> 16) & 255, (value >> 8) & 255, value & 255)
    except ValueError:
        return (255, 255, 255)


def positive_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _resolution_mpp(x_resolution: Any, unit: Any) -> float | None:
    """µm/px from a TIFF XResolution (pixels per unit, maybe a (num, den) rational) and ResolutionUnit."""
    if isinstance(x_resolution, tuple | list) and len(x_resolution) == 2:
        num, den = x_resolution
        x_resolution = num / den if den else None
    else:
        x_resolution = (
            positive_float(str(x_resolution).split("/")[0]) if isinstance(x_resolution, str) else x_resolution
        )
    res = positive_float(x_resolution)
    if res is None:
        return None
    unit = str(unit).lower()
    if unit in ("centimeter", "3", "resunit.centimeter"):
        return 10_000.0 / res
    if unit in ("inch", "2", "resunit.inch"):
        return 25_400.0 / res
    return None  # "none"/1: the numbers have no physical unit


def plausible_mpp(mpp: float | None) -> float | None:
    if mpp is None:
        return None
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


# --------------------------------------------------------------------------------------------------- backends
class Backend:
    """What a backend tells :class:`Slide`.

    ``read(location, level, size)`` takes ``location`` in level-0 pixels (OpenSlide's convention);
    ``read_level(location, level, size)`` takes it in pixels *of that level* and returns the level's stored
    pixels there, never resampled.
    """

    vendor: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    tile_sizes: list[int | None]
    properties: dict[str, str]
    mpp: float | None
    objective_power: float | None
    background: tuple[int, int, int] = (255, 255, 255)

    def read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        ds = self.level_downsamples[level]
        return self.read_level((round(location[0] / ds), round(location[1] / ds)), level, size)

    def read_level(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def parallel_reads(self, level: int) -> bool:
        """Whether one read of ``level`` decodes its tiles on several threads."""
        return False

    def close(self) -> None:
        pass


class _OpenSlideBackend(Backend):
    def __init__(self, path: Path) -> None:
        import openslide

        self._openslide = openslide
        self.handle = openslide.OpenSlide(str(path))
        props = dict(self.handle.properties)
        self.properties = props
        self.vendor = props.get("openslide.vendor", "openslide")
        self.level_dimensions = [tuple(map(int, d)) for d in self.handle.level_dimensions]
        self.level_downsamples = [float(d) for d in self.handle.level_downsamples]
        self.tile_sizes = [
            int(props[f"openslide.level[{i}].tile-width"])
            if f"openslide.level[{i}].tile-width" in props
            else None
            for i in range(len(self.level_dimensions))
        ]
        mpp = positive_float(props.get(openslide.PROPERTY_NAME_MPP_X))
        if mpp is None and "tiff.XResolution" in props:
            mpp = _resolution_mpp(props["tiff.XResolution"], props.get("tiff.ResolutionUnit", ""))
        self.raw_mpp = mpp
        self.mpp = plausible_mpp(mpp)
        self.objective_power = positive_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        self.background = _parse_background(props)
        self.name = path.name
        self.native: NativeTiles | None = None
        if self.vendor in NATIVE_VENDORS:
            try:
                self.native = NativeTiles(path, self.level_dimensions, self.background)
            except Exception as exc:  # not parseable by tifffile: OpenSlide alone reads it
                _log.info("%s: reading through OpenSlide only (%s)", path.name, exc)
        # Per level: True once a native read was checked against OpenSlide's (exact) read at the level's
        # origin, False when it did not match (then OpenSlide reads that level), None before the check.
        self._native_ok: list[bool | None] = [None] * len(self.level_dimensions)
        self._check_lock = threading.Lock()

    def _use_native(self, level: int) -> bool:
        if self.native is None or not self.native.has(level):
            return False
        with self._check_lock:
            if self._native_ok[level] is None:
                self._native_ok[level] = self._native_matches(level)
        return bool(self._native_ok[level])

    def _native_matches(self, level: int) -> bool:
        """Whether tifffile's decode of the level's first tile equals OpenSlide's (within JPEG rounding)."""
        w, h = self.level_dimensions[level]
        side = self.native.tile_shape(level)
        size = (min(side[1], w), min(side[0], h))
        try:
            mine = self.native.read(level, (0, 0), size)
        except SlideError:
            return True  # a damaged first tile: the native reader names it; OpenSlide could only fail too
        theirs = self._openslide_read((0, 0), level, size)  # the origin: no fractional offset, no resampling
        diff = int(np.abs(mine.astype(np.int16) - theirs.astype(np.int16)).max())
        if diff > NATIVE_TOLERANCE:
            _log.warning(
                "%s level %d: tifffile's pixels differ from OpenSlide's by %d; reading it through OpenSlide",
                self.name,
                level,
                diff,
            )
        return diff <= NATIVE_TOLERANCE

    def _openslide_read(self, location, level, size):
        try:
            image = self.handle.read_region(location, level, size)
        except self._openslide.OpenSlideError as exc:
            ds = self.level_downsamples[level]
            raise SlideError(
                f"{self.name} cannot be read at level {level} near ({round(location[0] / ds)}, "
                f"{round(location[1] / ds)}) px of that level, the file is damaged there ({exc})."
            ) from exc
        return composite(np.asarray(image), self.background)

    def read(self, location, level, size):
        if self._use_native(level):
            return super().read(location, level, size)
        return self._openslide_read(location, level, size)

    def parallel_reads(self, level):
        # native tiles decode on the decode pool; not yet checked against OpenSlide counts as native (no I/O)
        return self.native is not None and self.native.has(level) and self._native_ok[level] is not False

    def read_level(self, location, level, size):
        if self._use_native(level):
            return self.native.read(level, location, size)
        # OpenSlide takes level-0 coordinates: exact when the downsample is an integer, resampled by a
        # fraction of a pixel otherwise (formats whose tiles it alone can read).
        ds = self.level_downsamples[level]
        return self._openslide_read((round(location[0] * ds), round(location[1] * ds)), level, size)

    def close(self) -> None:
        self.handle.close()
        if self.native is not None:
            self.native.close()


class _TiffBackend(Backend):
    """OME-TIFF and plain (pyramidal) TIFF via tifffile's zarr store: only the needed tiles are decoded."""

    def __init__(self, path: Path) -> None:
        import tifffile
        import zarr

        self.tif = tifffile.TiffFile(str(path))
        try:
            series = self.tif.series[0]
            axes = series.axes
            levels = series.levels
            if not (axes.endswith("YXS") or axes.endswith("YX")) or any(
                n != 1 for n, a in zip(series.shape, axes, strict=False) if a not in "YXS"
            ):
                raise SlideError(
                    f"{path.name} holds a {axes} image stack, not a single 2-D RGB slide; "
                    "open one plane at a time."
                )
            self._arrays = [zarr.open(series.aszarr(level=i), mode="r") for i in range(len(levels))]
            self._axes = axes
            self.level_dimensions = []
            for level in levels:
                shape = dict(zip(axes, level.shape, strict=False))
                self.level_dimensions.append((int(shape["X"]), int(shape["Y"])))
            w0, h0 = self.level_dimensions[0]
            self.level_downsamples = [(w0 / w + h0 / h) / 2 for w, h in self.level_dimensions]
            self.tile_sizes = [lv.keyframe.tilewidth or None for lv in levels]
            self.properties = {}
            page = self.tif.pages.first
            for tag in ("ImageDescription", "XResolution", "YResolution", "ResolutionUnit", "Software"):
                if tag in page.tags:
                    self.properties[f"tiff.{tag}"] = str(page.tags[tag].value)
            self.vendor = "ome-tiff" if self.tif.is_ome else "generic-tiff"
            mpp, self.objective_power = None, None
            if self.tif.is_ome:
                mpp, self.objective_power = self._ome_facts()
            if mpp is None and "XResolution" in page.tags:
                mpp = _resolution_mpp(
                    page.tags["XResolution"].value,
                    page.tags["ResolutionUnit"].value.name if "ResolutionUnit" in page.tags else "inch",
                )
            self.raw_mpp = mpp
            self.mpp = plausible_mpp(mpp)
        except Exception:
            self.tif.close()
            raise

    def _ome_facts(self) -> tuple[float | None, float | None]:
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(self.tif.ome_metadata or "")
        except ET.ParseError:
            return None, None
        mpp = power = None
        for el in root.iter():
            tag = el.tag.rsplit("}", 1)[-1]
            if tag == "Pixels" and mpp is None:
                size = positive_float(el.get("PhysicalSizeX"))
                unit = el.get("PhysicalSizeXUnit", "µm")
                factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit)
                if size is not None and factor is not None:
                    mpp = size * factor
                    self.properties["ome.PhysicalSizeX"] = el.get("PhysicalSizeX", "")
                    self.properties["ome.PhysicalSizeXUnit"] = unit
            elif tag == "Objective" and power is None:
                power = positive_float(el.get("NominalMagnification"))
        return mpp, power

    def read_level(self, location, level, size):
        x, y = location
        w, h = size
        lw, lh = self.level_dimensions[level]
        out = np.empty((h, w, 3), dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):  # partly outside the level
            paint(out, self.background)
        if x1 <= x0 or y1 <= y0:
            return out
        index = tuple(
            slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None) if a == "S" else 0
            for a in self._axes
        )
        try:
            part = np.asarray(self._arrays[level][index])
            kept = [a for a in self._axes if a in "YXS"]
            if kept != ["Y", "X", "S"][: len(kept)]:  # planar RGB (SYX): samples first on disk
                part = np.transpose(part, [kept.index(a) for a in "YXS" if a in kept])
        except Exception as exc:  # tifffile/zarr raise many types for damaged tiles
            raise SlideError(
                f"{self.tif.filename} cannot be read at level {level}, region ({x0}, {y0}) px of that level: "
                f"its data is damaged ({type(exc).__name__}: {exc})."
            ) from exc
        if part.ndim == 2:  # greyscale
            part = np.repeat(part[..., None], 3, axis=2)
        if part.dtype != np.uint8:
            part = _to_uint8(part)
        if part.shape[2] == 4:
            part = composite(part, self.background)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = part[..., :3]
        return out

    def close(self) -> None:
        self.tif.close()


def _to_uint8(part: np.ndarray) -> np.ndarray:
    if part.dtype == np.uint16:  # 16-bit brightfield scans: keep the top byte
        return (part >> 8).astype(np.uint8)
    if part.dtype == bool:
        return part.astype(np.uint8) * 255
    return np.clip(part, 0, 255).astype(np.uint8)


class _ImageBackend(Backend):
    """A small plain image (PNG, JPEG): read whole once, single level."""

    def __init__(self, path: Path) -> None:
        from PIL import Image

        try:
            image = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise SlideError(
                f"{path.name} is a plain image too large to read whole; convert it to a tiled pyramidal TIFF."
            ) from exc
        with image:
            if image.width * image.height > MAX_PLAIN_IMAGE_PIXELS:
                raise SlideError(
                    f"{path.name} is a {image.width}x{image.height} plain image, too large to read whole; "
                    "convert it to a tiled pyramidal TIFF first."
                )
            self.properties = {
                f"image.{k}": str(v)
                for k, v in image.info.items()
                if isinstance(v, str | int | float | tuple)
            }
            self.properties["image.format"] = str(image.format)
            dpi = image.info.get("dpi")
            rgba = image.convert("RGBA")
            self.vendor = "image"
            self.background = (255, 255, 255)
            self.pixels = composite(np.asarray(rgba), self.background)
        self.level_dimensions = [(self.pixels.shape[1], self.pixels.shape[0])]
        self.level_downsamples = [1.0]
        self.tile_sizes = [None]
        self.raw_mpp = _resolution_mpp(dpi[0], "inch") if dpi else None
        self.mpp = plausible_mpp(self.raw_mpp)
        self.objective_power = None

    def read_level(self, location, level, size):
        x, y = location
        w, h = size
        lw, lh = self.level_dimensions[0]
        out = np.empty((h, w, 3), dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):  # partly outside the image
            paint(out, self.background)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.pixels[y0:y1, x0:x1]
        return out


# --------------------------------------------------------------------------------------------------- choosing
class _TifffileWarnings(logging.Handler):
    """Collects tifffile's warnings (it logs damaged directories, not raises) and keeps them off stderr."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []
        self._logger = logging.getLogger("tifffile")

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _TifffileWarnings:
        self._logger.addHandler(self)
        self._propagate, self._logger.propagate = self._logger.propagate, False
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate


def _tiff_damage(path: Path) -> str | None:
    """Why a TIFF file looks truncated or damaged, or None when its directories and tile data all fit."""
    import tifffile

    size = path.stat().st_size
    with _TifffileWarnings() as warnings:
        try:
            with tifffile.TiffFile(str(path)) as tif:
                pages = list(tif.pages)
                if not pages:
                    return "it has no readable image directory"
                for page in pages:
                    ends = [o + b for o, b in zip(page.dataoffsets, page.databytecounts, strict=False) if b]
                    if ends and max(ends) > size:
                        return "its image data runs past the end of the file"
        except Exception as exc:
            return f"its TIFF structure cannot be parsed ({exc})"
    if any("offset" in m for m in warnings.messages):
        return "its image directories point past the end of the file"
    return None


def open_backend(path: Path) -> Backend:
    import openslide

    suffix = path.suffix.lower()
    head = _sniff(path)
    is_tiff = head[:4] in _TIFF_MAGIC
    is_ome = path.name.lower().endswith((".ome.tif", ".ome.tiff"))
    plain = _magic_name(head)

    if plain is not None and suffix in WSI_SUFFIXES:
        rename = ".png" if "PNG" in plain else ".jpg" if "JPEG" in plain else None
        hint = f"; rename it to {rename} to open it as a plain image" if rename else ""
        raise SlideError(f"{path.name} is {plain}, not a whole-slide image{hint}.")

    if is_tiff and not is_ome:
        import tifffile

        try:
            with _TifffileWarnings(), tifffile.TiffFile(str(path)) as tif:
                is_ome = bool(tif.is_ome)
        except Exception:  # damaged: reported below once OpenSlide has had its say
            pass

    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        fmt = None
    # OpenSlide reads OME-TIFF as a one-level generic TIFF (it ignores SubIFD pyramids and OME pixel sizes).
    if fmt is not None and not (is_ome and fmt == "generic-tiff"):
        try:
            return _OpenSlideBackend(path)
        except openslide.OpenSlideError as exc:
            damage = _tiff_damage(path) if is_tiff else None
            if damage is not None:
                raise SlideError(f"{path.name} is truncated or damaged: {damage}.") from exc
            raise SlideError(f"OpenSlide recognised {path.name} as {fmt} but cannot open it: {exc}.") from exc

    if is_tiff:
        damage = _tiff_damage(path)
        if damage is not None:
            raise SlideError(f"{path.name} is truncated or damaged: {damage}.")
        if suffix in WSI_SUFFIXES and not is_ome:
            raise SlideError(
                f"{path.name} is a TIFF file that OpenSlide does not recognise as a {suffix} slide."
            )
        try:
            return _TiffBackend(path)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(
                f"{path.name} is a TIFF file that neither OpenSlide nor tifffile can read: {exc}."
            ) from exc

    if plain is not None and suffix not in WSI_SUFFIXES:
        try:
            return _ImageBackend(path)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(
                f"{path.name} is {plain} that Pillow cannot decode (truncated?): {exc}."
            ) from exc

    what = f"it is {plain}" if plain else "its content matches no format OpenSlide, tifffile or Pillow reads"
    raise SlideError(f"{path.name} is not a slide this plugin can open: {what}.")
