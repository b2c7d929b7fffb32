"""The Model dock says when a slide is outside the model's training data, and paints the feature distance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_he2rna.maps import heatmaps
from napari_he2rna.maps.gene_sets import DISTANCE_NAME
from napari_he2rna.model import ood
from napari_he2rna.model.bundle import save_bundle
from napari_he2rna.model.network import HE2RNA
from napari_he2rna.napari._model_widget import ModelWidget
from napari_he2rna.napari._state import get_registry

REPO = Path(__file__).resolve().parents[2]
SAMPLE_SLIDE = REPO / "sample_data" / "sample_slide.tiff"
GENES = ["CD3D", "CD3E", "CD3G", "CD247", "MKI67", "GAPDH"]
RUN_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory) -> Path:
    """A small hed-stats bundle carrying the feature reference of the committed demo model (300 synthetic
    slides): the Model dock must warn on a real H&E slide and not on the synthetic sample slide."""
    import torch

    from napari_he2rna.maps.session import default_model_path
    from napari_he2rna.model.bundle import load_bundle

    root = tmp_path_factory.mktemp("qtref")
    reference = ood.bundle_reference(load_bundle(default_model_path()))
    assert reference is not None, "the committed demo bundle carries a feature reference"
    torch.manual_seed(0)
    net = HE2RNA(33, len(GENES), hidden=(16,), dropout=0.0).eval()
    meta = {ood.REFERENCE_KEY: reference}
    return save_bundle(root / "ref_model.safetensors", [net], GENES, "hed-stats", 33, 112.0, [1, 10], meta)


def _run(widget: ModelWidget, qtbot) -> None:
    assert widget.run() is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)


def test_model_dock_warns_on_a_slide_outside_the_training_data(
    make_napari_viewer, qtbot, cmu_slide, reference_model, notifications
):
    viewer = make_napari_viewer()
    real = viewer.open(str(cmu_slide), plugin="napari-he2rna")[0]
    widget = ModelWidget(viewer, model_path=reference_model)
    viewer.window.add_dock_widget(widget, name="Model")
    assert not widget.ood_label.isVisibleTo(widget)  # nothing to say before a run
    assert widget.gene_model.stringList()[0] == DISTANCE_NAME

    widget.slide_picker.value = real
    _run(widget, qtbot)
    session = get_registry(viewer).get(real).session
    assert session.ready
    assert widget.ood_label.isVisibleTo(widget)
    text = widget.ood_label.text()
    assert text.startswith("Warning: This slide's features are outside the model's training data")
    assert session.cached_assessment.outside
    assert not any(sev == "error" for sev, _ in notifications)

    # the distance is painted like a gene, in its own units
    layer = widget.paint(DISTANCE_NAME)
    assert layer is not None and layer.name == DISTANCE_NAME
    shown = heatmaps.tile_values(layer.data, session.grid)  # f x f pixels a tile, clipped to the slide
    np.testing.assert_allclose(shown, session.tile_distances(), rtol=1e-6)
    assert layer.metadata["units"] == ood.DISTANCE_UNITS
    assert layer.contrast_limits[0] == 0.0

    # the synthetic sample slide is like the training slides: no warning for it
    sample = viewer.open(str(SAMPLE_SLIDE), plugin="napari-he2rna")[0]
    widget.slide_picker.value = sample
    assert not widget.ood_label.isVisibleTo(widget)  # not run yet
    _run(widget, qtbot)
    assert widget.ood_label.isVisibleTo(widget)
    assert "within the model's training data" in widget.ood_label.text()
    assert not widget.ood_label.text().startswith("Warning")
    # back on the real slide, its warning shows again
    widget.slide_picker.value = real
    assert widget.ood_label.text().startswith("Warning:")
