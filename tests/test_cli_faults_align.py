"""Bad input and faults of ``he2rna align`` and ``he2rna compare --transform`` through the CLI (issue 21,
causes 2-5 and three of its "also seen"): one test per cause.

Each runs ``cli.main`` in this process (``conftest.run_cli_in_process``) and checks the exit code, that the
error is one sentence without a traceback, and that nothing was written. Where the alignment must not even
start (a bad option, a bad landmark file, an unusable ``--out``), :func:`no_alignment` makes the alignment
itself a failure.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_he2rna.errors import AlignmentError
from napari_he2rna.validation import align
from napari_he2rna.validation.align_image import prepare_image
from napari_he2rna.validation.landmarks import landmark_errors, match_landmarks, read_landmarks

W, H, TILE, MPP = 256, 192, 32, 0.5


def one_sentence(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single ``he2rna: error:`` line of a failed run (asserting the exit code and no traceback)."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("he2rna: error:") and lines[0].endswith("."), proc.stderr
    return lines[0]


def usage_error(proc: subprocess.CompletedProcess, option: str) -> str:
    """argparse's refusal of one option: exit 2, its usage, then one ``error: argument OPTION:`` sentence."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr
    assert errors[0].startswith(f"he2rna align: error: argument {option}: ") and errors[0].endswith(".")
    return errors[0]


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_alignment(monkeypatch):
    """The alignment, made a failure of the test: the run must stop before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the alignment ran")

    monkeypatch.setattr(align, "align_slides", refuse)


@pytest.fixture
def slides(tmp_path) -> tuple[Path, Path]:
    """Two small images to pass as FIXED and MOVING (the alignment never runs on them)."""
    rgb = np.full((H, W, 3), 240, np.uint8)
    rgb[40:150, 60:200] = (150, 80, 160)
    paths = tmp_path / "he.png", tmp_path / "ihc.png"
    for p in paths:
        Image.fromarray(rgb).save(p)
    return paths


# -------------------------------------------------------------------------------- 2. the transform JSON
@pytest.fixture
def compare_inputs(tmp_path) -> tuple[Path, Path]:
    """A tile-scores CSV of a W x H slide and QuPath cells (GeoJSON points) to compare it with."""
    n_cols, n_rows = W // TILE, H // TILE
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    table = pd.DataFrame(
        {
            "tile_id": np.arange(n_rows * n_cols),
            "row": rows,
            "col": cols,
            "x_px": cols * TILE,
            "y_px": rows * TILE,
            "size_px": TILE,
            "score": np.random.default_rng(0).random(n_rows * n_cols),
        }
    )
    scores = tmp_path / "scores.csv"
    with open(scores, "w") as fh:
        fh.write(f"# mpp={MPP}; tile_px={TILE}; slide_width={W}; slide_height={H}\n")
        table.to_csv(fh, index=False)
    xy = np.random.default_rng(1).random((300, 2)) * [W, H]
    cells = tmp_path / "cells.geojson"
    cells.write_text(json.dumps({"type": "FeatureCollection", "features": [_point(x, y) for x, y in xy]}))
    return scores, cells


def compare(cli, scores: Path, cells: Path, transform: Path, out: Path) -> subprocess.CompletedProcess:
    """``he2rna compare`` of the W x H slide's scores with ``cells`` drawn on the scan ``transform`` maps."""
    size = ["--slide-size", W, H]
    return cli("compare", "--scores", scores, *size, "--cells", cells, "--transform", transform, "--out", out)


def _point(x: float, y: float, kind: str = "detection") -> dict:
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [float(x), float(y)]},
        "properties": {"objectType": kind},
    }


GOOD = {
    "affine_px": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
    "mpp_fixed": MPP,
    "mpp_moving": MPP,
    "fixed_dimensions": [W, H],
    "similarity": 0.7,
    "seconds": 1.5,
    "landmarks": {},
}
BAD_TRANSFORMS = {
    "a string matrix": ({"affine_px": "eye(3)"}, "'affine_px'"),
    "a dict matrix": ({"affine_px": {"a": 1, "b": 0}}, "'affine_px'"),
    "a ragged matrix": ({"affine_px": [[1, 0, 0], [0, 1], [0, 0, 1]]}, "'affine_px'"),
    "a matrix of strings": ({"affine_px": [["1", "0", "0"], ["0", "1", "0"]]}, "'affine_px'"),
    "a matrix holding NaN": ({"affine_px": [[1, 0, float("nan")], [0, 1, 0]]}, "'affine_px'"),
    "a projective last row": ({**GOOD, "affine_px": [[1, 0, 0], [0, 1, 0], [0.01, 0, 1]]}, "projective"),
    "fixed_dimensions as a string": ({**GOOD, "fixed_dimensions": "256x192"}, "'fixed_dimensions'"),
    "fixed_dimensions as a number": ({**GOOD, "fixed_dimensions": 256}, "'fixed_dimensions'"),
    "mpp_moving as a string": ({**GOOD, "mpp_moving": "half"}, "'mpp_moving'"),
    "an absurd mpp_moving": ({**GOOD, "mpp_moving": 1e6}, "'mpp_moving'"),
    "a negative mpp_moving": ({**GOOD, "mpp_moving": -0.5}, "'mpp_moving'"),
    "similarity as a string": ({**GOOD, "similarity": "high"}, "'similarity'"),
    "seconds as a string": ({**GOOD, "seconds": "fast"}, "'seconds'"),
    "landmarks as a list": ({**GOOD, "landmarks": [1, 2]}, "'landmarks'"),
    "flipped as a string": ({**GOOD, "flipped": "no"}, "'flipped'"),
    "flipped that the matrix denies": ({**GOOD, "flipped": True}, "'flipped'"),
    "a stale affine_um": ({**GOOD, "affine_um": [[2, 0, 0], [0, 2, 0], [0, 0, 1]]}, "'affine_um'"),
    "a list, not an object": ([GOOD], "not a transform"),
}


@pytest.mark.parametrize("case", list(BAD_TRANSFORMS))
def test_a_bad_transform_file_is_one_sentence_naming_the_field(
    case, compare_inputs, tmp_path, cli_in_process
):
    data, field = BAD_TRANSFORMS[case]
    transform = tmp_path / "transform.json"
    transform.write_text(json.dumps(data))
    scores, cells = compare_inputs
    proc = compare(cli_in_process, scores, cells, transform, tmp_path / "out")
    line = one_sentence(proc)
    assert "transform.json" in line and field in line, line
    assert not (tmp_path / "out").exists()


def test_a_deeply_nested_transform_file_is_one_sentence(compare_inputs, tmp_path, cli_in_process):
    transform = tmp_path / "transform.json"
    transform.write_text('{"affine_px": ' + "[" * 100_000 + "]" * 100_000 + "}")
    scores, cells = compare_inputs
    proc = compare(cli_in_process, scores, cells, transform, tmp_path / "out")
    assert "transform.json" in one_sentence(proc)
    assert not (tmp_path / "out").exists()


def test_a_mirroring_transform_maps_the_truth_and_old_files_read_unflipped(
    compare_inputs, tmp_path, cli_in_process
):
    """The truth drawn on a mirrored (face-down) IHC: ``flipped`` and the matrix's mirror reach the cells."""
    scores, cells = compare_inputs
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(GOOD))  # written before 'flipped' existed: read as not flipped
    assert not align.AlignmentResult.read(plain).flipped
    assert compare(cli_in_process, scores, cells, plain, tmp_path / "plain").returncode == 0
    # the same cells on the IHC as scanned face-down (x mirrored), with the transform that mirrors back
    xy = np.array([f["geometry"]["coordinates"] for f in json.loads(cells.read_text())["features"]])
    mirrored_cells = tmp_path / "mirrored_cells.geojson"
    features = [_point(W - 1 - x, y) for x, y in xy]
    mirrored_cells.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    flipped = tmp_path / "flipped.json"
    flipped.write_text(
        json.dumps({**GOOD, "affine_px": [[-1, 0, W - 1], [0, 1, 0], [0, 0, 1]], "flipped": True})
    )
    assert align.AlignmentResult.read(flipped).flipped
    proc = compare(cli_in_process, scores, mirrored_cells, flipped, tmp_path / "flipped")
    assert proc.returncode == 0, proc.stderr
    counts = [pd.read_csv(tmp_path / name / "tiles.csv")["cell count"] for name in ("plain", "flipped")]
    assert counts[0].sum() == 300
    pd.testing.assert_series_equal(counts[0], counts[1])


# -------------------------------------------------------------------------------- 3. landmark files
BAD_LANDMARKS = {
    "42.geojson": ("42", "42.geojson"),
    "strings.geojson": ('["a", "b"]', "feature 1"),
    "no_coordinates.geojson": (
        json.dumps(
            {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Point"}}]}
        ),
        "without numeric coordinates",
    ),
    "points_and_a_polygon.geojson": (
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    _point(1, 2, "annotation"),
                    _point(3, 4, "annotation"),
                    {
                        "type": "Feature",
                        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]},
                    },
                    _point(5, 6, "annotation"),
                ],
            }
        ),
        "feature 3 of points_and_a_polygon.geojson is a Polygon",
    ),
    "a_word_in_a_row.csv": (",X,Y\n0,1,2\n1,three,4\n2,5,6\n", "landmark 2"),
    "an_id_twice.csv": (",X,Y\n0,1,2\n1,3,4\n1,5,6\n", "id 1 twice"),
}


@pytest.mark.parametrize("name", list(BAD_LANDMARKS))
def test_a_landmark_file_that_is_not_points_is_one_sentence(
    name, slides, tmp_path, cli_in_process, no_alignment
):
    text, expected = BAD_LANDMARKS[name]
    good, bad = tmp_path / "good.csv", tmp_path / name
    good.write_text(",X,Y\n0,1,2\n1,3,4\n2,5,6\n3,7,8\n")
    bad.write_text(text)
    before = files_in(tmp_path)
    proc = cli_in_process(
        "align", *slides, "--out", tmp_path / "t.json", "--landmarks-fixed", good, "--landmarks-moving", bad
    )
    line = one_sentence(proc)
    assert expected in line and name in line, line
    assert files_in(tmp_path) == before


# -------------------------------------------------------------------------------- 4. --rotation-step
@pytest.mark.parametrize("step", ["0", "-15", "nan", "inf", "400"])
def test_a_rotation_step_that_is_no_step_is_refused(step, slides, tmp_path, cli_in_process, no_alignment):
    before = files_in(tmp_path)
    proc = cli_in_process("align", *slides, "--out", tmp_path / "t.json", f"--rotation-step={step}")
    assert "from 0.5 to 360" in usage_error(proc, "--rotation-step")
    assert files_in(tmp_path) == before


# -------------------------------------------------------------------------------- also seen: --max-side 0
@pytest.mark.parametrize("side", ["0", "-512", "12.5", "100000"])
def test_a_working_resolution_that_is_no_size_is_refused(
    side, slides, tmp_path, cli_in_process, no_alignment
):
    before = files_in(tmp_path)
    proc = cli_in_process("align", *slides, "--out", tmp_path / "t.json", f"--max-side={side}")
    line = usage_error(proc, "--max-side")
    assert "no tissue" not in line and "whole number of pixels" in line
    assert files_in(tmp_path) == before


# ---------------------------------------------------------------------- also seen: --out after the work
def test_an_unusable_out_is_refused_before_the_work(slides, tmp_path, cli_in_process, no_alignment):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    before = files_in(tmp_path)
    for out, extra, expected in (
        (a_file / "t.json", [], "is a file, not a folder"),
        (tmp_path / "a_folder", ["--overwrite"], "is a folder"),
    ):
        line = one_sentence(cli_in_process("align", *slides, "--out", out, *extra))
        assert expected in line, line
    assert files_in(tmp_path) == before and (tmp_path / "a_folder").is_dir()


def test_a_missing_out_folder_is_made_after_the_work(slides, tmp_path, cli_in_process, monkeypatch):
    """--out in a folder not made yet: written once the alignment succeeded, left unmade when it failed."""
    found = align.AlignmentResult(np.eye(3), None, None, fixed_dimensions=(W, H), moving_dimensions=(W, H))
    monkeypatch.setattr(align, "align_slides", lambda *a, **k: found)
    proc = cli_in_process("align", *slides, "--out", tmp_path / "new" / "t.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "new" / "t.json").read_text())["flipped"] is False

    def fails(*args, **kwargs):
        raise AlignmentError("the automatic alignment failed: the slides are unlike each other.")

    monkeypatch.setattr(align, "align_slides", fails)
    one_sentence(cli_in_process("align", *slides, "--out", tmp_path / "other" / "t.json"))
    assert not (tmp_path / "other").exists()


# -------------------------------------------------------------------------------- 5. a mirrored section
@pytest.fixture(scope="module")
def rat_kidney(shared_data):
    d = shared_data / "he_ihc_pairs"
    f_xy, m_xy = match_landmarks(
        read_landmarks(d / "Rat-Kidney_HE.csv"), read_landmarks(d / "Rat-Kidney_PanCytokeratin.csv")
    )
    return d / "Rat-Kidney_HE.jpg", d / "Rat-Kidney_PanCytokeratin.jpg", f_xy, m_xy


def test_a_section_mounted_face_down_is_aligned_mirrored(rat_kidney, tmp_path, cli_in_process):
    """The real IHC, mirrored: the alignment finds it face-down (``flipped``) and meets the landmark goal."""
    he, ihc, f_xy, m_xy = rat_kidney
    rgb = np.asarray(Image.open(ihc).convert("RGB"))
    w = rgb.shape[1]
    mirrored = tmp_path / "ihc_face_down.png"
    Image.fromarray(np.ascontiguousarray(rgb[:, ::-1])).save(mirrored)
    lf, lm = tmp_path / "he.csv", tmp_path / "ihc.csv"
    pd.DataFrame(f_xy, columns=["X", "Y"]).to_csv(lf)
    pd.DataFrame(np.column_stack([w - 1 - m_xy[:, 0], m_xy[:, 1]]), columns=["X", "Y"]).to_csv(lm)
    out = tmp_path / "t.json"
    proc = cli_in_process(
        "align", he, mirrored, "--out", out, "--landmarks-fixed", lf, "--landmarks-moving", lm
    )
    assert proc.returncode == 0, proc.stderr
    assert "mirrored" in proc.stdout
    data = json.loads(out.read_text())
    assert data["flipped"] is True and np.linalg.det(np.asarray(data["affine_px"])[:2, :2]) < 0
    assert data["landmarks"]["aligned"]["median_rtre"] <= 0.005, data["landmarks"]
    assert data["landmarks"]["aligned"]["max_rtre"] < 0.03, data["landmarks"]
    assert data["similarity"] > align.MIN_SIMILARITY


def test_the_mirrored_fit_is_below_the_floor(rat_kidney):
    """The fit the issue saw pass (similarity 0.31 against a 0.30 floor): not trying the mirror, refused."""
    he, ihc, f_xy, m_xy = rat_kidney
    f_rgb = np.asarray(Image.open(he).convert("RGB"))
    m_rgb = np.ascontiguousarray(np.asarray(Image.open(ihc).convert("RGB"))[:, ::-1])

    def image(rgb):
        h, w = rgb.shape[:2]
        small = np.asarray(Image.fromarray(rgb).resize((512, round(512 * h / w)), Image.BILINEAR))
        return prepare_image(small, (w / small.shape[1], h / small.shape[0]), None, (w, h))

    with pytest.raises(AlignmentError, match="similarity") as info:
        align.align_images(image(f_rgb), image(m_rgb), try_mirror=False)
    w = m_rgb.shape[1]
    err = landmark_errors(
        info.value.result.affine_px,
        f_xy,
        np.column_stack([w - 1 - m_xy[:, 0], m_xy[:, 1]]),
        fixed_dimensions=f_rgb.shape[1::-1],
    )
    assert err["median_rtre"] > 0.1  # it was wrong indeed
