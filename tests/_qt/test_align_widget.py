"""The Compare dock's IHC slide and automatic alignment in a real napari viewer (Xvfb), on the ANHIR
rat-kidney consecutive sections (H&E and pan-cytokeratin IHC, 69 matched landmarks)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_he2rna.napari._compare_widget import CompareWidget
from napari_he2rna.napari._reader import slide_layer_data
from napari_he2rna.slides.slide import open_slide
from napari_he2rna.validation.landmarks import landmark_errors, match_landmarks, read_landmarks

MPP = 2.0  # the shared JPEGs do not say their pixel size: give one, as the Slide widget would


@pytest.fixture
def dock(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    d = shared_data / "he_ihc_pairs"
    data, kwargs, _ = slide_layer_data(open_slide(d / "Rat-Kidney_HE.jpg", mpp=MPP))
    layer = viewer.add_image(data, **kwargs)
    widget = CompareWidget(viewer)
    return viewer, layer, widget, d


def test_dock_aligns_the_ihc_and_shows_the_moved_layer(dock, qtbot):
    viewer, layer, widget, d = dock
    assert widget.load_ihc_slide(d / "Rat-Kidney_PanCytokeratin.jpg")
    ihc = widget.ihc_layer
    assert ihc in viewer.layers and widget.slide_combo.count() == 1  # the IHC is not a second H&E
    np.testing.assert_allclose(ihc.affine.affine_matrix, np.eye(3))
    worker = widget.align_automatically()
    assert worker is not None and not widget.align_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.aligning, timeout=120_000)
    assert widget.align_label.text().startswith("Aligned:"), widget.align_label.text()
    assert widget.rotation_spin.value() == pytest.approx(1.1, abs=0.5)
    assert widget.scale_spin.value() == pytest.approx(1.07, abs=0.02)
    # the layer moved with the fields, and the fields' affine puts the landmarks where they belong
    a = widget.alignment().affine
    yx = ihc.affine.affine_matrix
    np.testing.assert_allclose(yx[:2, :2], [[a[1, 1], a[1, 0]], [a[0, 1], a[0, 0]]], atol=1e-9)
    np.testing.assert_allclose(yx[:2, 2], [a[1, 2], a[0, 2]], atol=1e-9)
    f_xy, m_xy = match_landmarks(
        read_landmarks(d / "Rat-Kidney_HE.csv"),
        read_landmarks(d / "Rat-Kidney_PanCytokeratin.csv"),
    )
    dims = Image.open(d / "Rat-Kidney_HE.jpg").size
    err = landmark_errors(widget.alignment().affine_px(MPP), f_xy, m_xy, fixed_dimensions=dims)
    assert err["median_rtre"] <= 0.005
    # a landmark of the IHC, drawn through the layer's own transform, lands on its H&E match
    world = ihc.data_to_world(m_xy[0][::-1])
    assert np.hypot(*(np.asarray(world)[::-1] / MPP - f_xy[0])) < 0.02 * np.hypot(*dims)
    # the fields stay editable: a typed affine moves the layer, the stretch/shear is kept
    widget.affine_edit.setText("1 0 10 0 1.1 -5")
    widget.affine_edit.editingFinished.emit()  # what Enter does
    np.testing.assert_allclose(widget.alignment().affine[:2], [[1, 0, 10], [0, 1.1, -5]], atol=1e-5)
    np.testing.assert_allclose(ihc.affine.affine_matrix[:2, 2], [-5, 10], atol=1e-9)
    assert widget.scale_spin.value() == pytest.approx(np.sqrt(1.1), abs=1e-6)
    widget.reset_alignment()
    np.testing.assert_allclose(ihc.affine.affine_matrix, np.eye(3), atol=1e-12)


def test_dock_says_when_the_alignment_fails_and_keeps_the_fields(dock, qtbot, tmp_path):
    viewer, layer, widget, d = dock
    blank = tmp_path / "blank_ihc.png"
    Image.fromarray(np.full((400, 600, 3), 243, np.uint8)).save(blank)
    assert widget.load_ihc_slide(blank)
    widget.set_alignment((5.0, -3.0), 1.0, 2.0)
    widget.align_automatically()
    qtbot.waitUntil(lambda: not widget.aligning, timeout=60_000)
    assert "no tissue was found on the moving slide" in widget.align_label.text()
    assert (widget.offset_x.value(), widget.offset_y.value(), widget.rotation_spin.value()) == (
        5.0,
        -3.0,
        2.0,
    )
    assert widget.align_button.isEnabled()
