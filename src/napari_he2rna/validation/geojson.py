"""What the truth readers share: QuPath GeoJSON features and their class names, and the file checks.

QuPath GeoJSON gives level-0 pixels of the image it was drawn on; a FeatureCollection, one Feature or a bare
list of features (as QuPath scripts write) are read alike. shapely, when installed, is the one optional
geometry library of the readers (:data:`shapely` is ``None`` without it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError

try:  # shapely repairs invalid polygons (make_valid) and computes exact centroids; optional but preferred
    import shapely
    import shapely.geometry
except ImportError:  # pragma: no cover - exercised only where shapely is missing
    shapely = None

UNCLASSIFIED = "Unclassified"


def check_file(path: Path, what: str) -> None:
    """Raise :class:`DataError` when the ``what`` file is missing or empty."""
    if not path.is_file():
        raise DataError(f"the {what} file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"the {what} file {path} is empty (0 bytes); export it again from QuPath")


def class_name(classification: Any) -> str:
    """QuPath's ``classification``: ``{name}``, ``{names: [...]}`` (derived classes) or a plain string."""
    if not classification:
        return UNCLASSIFIED
    if isinstance(classification, str):
        return classification or UNCLASSIFIED
    if isinstance(classification, dict):
        if classification.get("name"):
            return str(classification["name"])
        names = classification.get("names")
        if names:
            return ": ".join(str(n) for n in names)
    return UNCLASSIFIED


def load_geojson_features(path: Path) -> list[dict]:
    """The features of a QuPath GeoJSON export that have a geometry (:class:`DataError` for a bad file)."""
    check_file(path, "GeoJSON")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path.name} is not valid GeoJSON ({exc.__class__.__name__}: {exc})") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features") or []
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):  # QuPath scripts write a bare list of features
        features = data
    else:
        raise DataError(f"{path.name} is JSON but not a GeoJSON FeatureCollection or list of features")
    return [f for f in features if isinstance(f, dict) and isinstance(f.get("geometry"), dict)]
