"""The plugin in a real napari viewer (Xvfb + Mesa): reader, µm scale, rendering, bad files, Slide widget."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile

from napari_he2rna.errors import SlideError
from napari_he2rna.napari import _sample_data
from napari_he2rna.napari._reader import get_reader
from napari_he2rna.napari._slide_widget import SlideWidget
from napari_he2rna.slides.slide import Slide


def test_viewer_opens_cmu_slide_in_microns(make_napari_viewer, cmu_slide, qtbot):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(str(cmu_slide), plugin="napari-he2rna")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.multiscale and layer.rgb
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    assert isinstance(layer.metadata["slide"], Slide)
    assert [tuple(d.shape) for d in layer.data] == [(2967, 2220, 3), (1483, 1110, 3)]
    # the world extent is the slide's size in µm
    assert layer.extent.world[1][0] == pytest.approx(2967 * 0.499, rel=1e-3)

    viewer.reset_view()
    qtbot.wait(300)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[0] > 50
    rgb = shot[..., :3].astype(float)
    # real tissue drawn: varied pixels, and pink-ish (red > green) somewhere, not only the dark canvas
    assert rgb.std() > 20
    assert ((rgb[..., 0] - rgb[..., 1]) > 20).mean() > 0.05

    slide = layer.metadata["slide"]
    viewer.layers.remove(layer)
    assert slide.closed  # the file handle goes with its last layer


def test_bad_files_give_notifications_not_exceptions(
    make_napari_viewer, tmp_path, shared_data, notifications
):
    viewer = make_napari_viewer()
    fake = tmp_path / "boxes.svs"
    shutil.copy(shared_data / "slides" / "openslide-fixtures" / "boxes.png", fake)
    empty = tmp_path / "empty.ndpi"
    empty.write_bytes(b"")
    assert viewer.open(str(fake), plugin="napari-he2rna") == []
    assert viewer.open(str(empty), plugin="napari-he2rna") == []
    assert len(viewer.layers) == 0
    messages = [m for _, m in notifications]
    assert any("boxes.svs is a PNG image, not a whole-slide image" in m for m in messages)
    assert any("empty.ndpi is empty (0 bytes)" in m for m in messages)
    # the viewer stays usable: a good slide opens afterwards
    good = shared_data / "slides" / "openslide-fixtures" / "small.svs"
    assert len(viewer.open(str(good), plugin="napari-he2rna")) == 1


def test_reader_declines_what_it_cannot_read(tmp_path, shared_data):
    assert get_reader(str(tmp_path / "table.csv")) is None
    text = tmp_path / "notes.tif"
    text.write_text("not an image")
    assert get_reader(str(text)) is None  # a plain suffix: let other readers try
    assert callable(get_reader(str(shared_data / "slides" / "cmu-1-small-region.svs")))


def test_missing_mpp_warns_and_widget_sets_it(make_napari_viewer, shared_data, notifications):
    viewer = make_napari_viewer()
    widget = SlideWidget(viewer)
    boxes = shared_data / "slides" / "openslide-fixtures" / "boxes.tiff"
    widget.open_path(boxes)
    layer = viewer.layers[-1]
    assert layer.metadata["mpp_missing"] is True
    assert tuple(layer.scale) == (1.0, 1.0)
    assert any(sev == "warning" and "does not say its pixel size" in m for sev, m in notifications)
    assert "µm/px: unknown" in widget.facts.value
    assert "4: 300x250" in widget.facts.value and "generic-tiff" in widget.facts.value

    widget.set_mpp("abc")  # rejected with a notification, nothing changes
    assert any("positive number of µm per pixel" in m for _, m in notifications)
    assert tuple(layer.scale) == (1.0, 1.0)

    widget.mpp.value = "0.5"
    widget.mpp_button.clicked.emit()
    assert tuple(layer.scale) == pytest.approx((0.5, 0.5))
    assert layer.metadata["slide"].mpp == 0.5 and layer.metadata["mpp_missing"] is False
    assert "µm/px: 0.5" in widget.facts.value


def test_slide_widget_shows_facts(make_napari_viewer, cmu_slide, notifications):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-he2rna", "Slide")
    assert isinstance(widget, SlideWidget)
    assert widget.facts.value == "No slide open."
    widget.file.value = cmu_slide
    widget.open_button.clicked.emit()
    assert len(viewer.layers) == 1
    text = widget.facts.value
    for fact in ("aperio", "2220 x 2967 px", "1: 2220x2967", "µm/px: 0.499", "objective: 20x"):
        assert fact in text
    assert widget.mpp.value == "0.499"
    widget.file.value = cmu_slide.parent / "no-such-slide.svs"
    widget.open_button.clicked.emit()
    assert len(viewer.layers) == 1
    assert any("No such file" in m for _, m in notifications)


def test_sample_data(monkeypatch, tmp_path):
    monkeypatch.setattr(_sample_data, "sample_data_dir", lambda: tmp_path)
    with pytest.raises(SlideError, match="he2rna make-sample"):
        _sample_data.sample_slide()
    image = np.full((256, 384, 3), 230, dtype=np.uint8)
    tifffile.imwrite(
        tmp_path / "sample_slide.tiff",
        image,
        tile=(128, 128),
        photometric="rgb",
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    [(data, kwargs, kind)] = _sample_data.sample_slide()
    assert kind == "image" and kwargs["scale"] == (0.5, 0.5) and kwargs["rgb"]
    kwargs["metadata"]["slide"].close()


def test_slide_widget_shows_tissue_mask_and_removed_ink(make_napari_viewer, shared_data, notifications):
    viewer = make_napari_viewer()
    widget = SlideWidget(viewer)
    assert widget.show_masks() is None  # no slide yet: a message, no layer
    assert any("Open a slide first" in m for _, m in notifications)
    thumb = shared_data / "thumbnails" / "diagnostic-slide-thumb-rgb.png"  # real TCGA thumbnail, red pen
    widget.open_path(thumb)
    assert widget.show_masks() is None  # a PNG has no pixel size: asked for first
    assert any("has no pixel size" in m for _, m in notifications)
    widget.set_mpp(8.0)
    tissue, ink = widget.show_masks()
    assert tissue.name.startswith("tissue mask") and ink.name.startswith("removed ink")
    assert 0.3 < (tissue.data > 0).mean() < 0.7 and (ink.data > 0).mean() > 0.1  # the pen halo is removed
    assert not ((tissue.data > 0) & (ink.data > 0)).any()
    slide_layer = viewer.layers[0]
    # the masks cover the slide in µm: same extent as the slide layer
    np.testing.assert_allclose(
        np.array(tissue.data.shape) * np.array(tissue.scale),
        np.array(slide_layer.level_shapes[0][:2]) * np.array(slide_layer.scale),
    )
    widget.show_masks()  # again: replaced, not doubled
    assert sum(ly.name.startswith("tissue mask") for ly in viewer.layers) == 1
