"""``he2rna view``: a real viewer with the slide in µm and every widget of the manifest docked."""

from __future__ import annotations

import pytest

from napari_he2rna.errors import SlideError
from napari_he2rna.napari.viewer import manifest_widgets, open_viewer


def test_manifest_declares_the_panel_and_the_four_widgets():
    assert manifest_widgets() == ["HE2RNA", "Slide", "Model", "Export", "Compare"]


def test_view_opens_slide_and_docks_every_widget(cmu_slide, qtbot):
    viewer = open_viewer(str(cmu_slide), show=False)
    try:
        assert len(viewer.layers) == 1
        layer = viewer.layers[0]
        assert layer.multiscale
        assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
        docked = dict(viewer.window.dock_widgets)
        assert len(docked) == 1, docked  # one dock, the widgets as its tabs
        panel = next(iter(docked.values()))
        tabs = [panel.tabs.tabText(i) for i in range(panel.tabs.count())]
        assert tabs == ["Slide", "Model", "Compare", "Export"]
    finally:
        viewer.close()


def test_view_with_mpp_override(cmu_slide, qtbot):
    viewer = open_viewer(str(cmu_slide), mpp=0.25, show=False)
    try:
        assert tuple(viewer.layers[0].scale) == pytest.approx((0.25, 0.25))
    finally:
        viewer.close()


def test_view_missing_slide_is_one_sentence(tmp_path):
    with pytest.raises(SlideError, match="does not exist"):
        open_viewer(str(tmp_path / "nope.svs"), show=False)
