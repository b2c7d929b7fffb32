"""The "Model" dock widget: choose a model, run it on a slide, paint gene / gene-set heatmaps.

Only wiring: the work is :class:`napari_he2rna.maps.session.SlideSession` (one per slide layer, kept by
:mod:`._state`). **Run** computes the slide's tile features in a napari ``thread_worker`` (progress in the
widget, **Cancel** sets a ``threading.Event`` the compute code checks); the tile
grid is drawn as a light outline layer as soon as it is known. A pick in the gene box paints an Image
layer named after the gene/set: each tile's percentile within the slide, NaN off tissue, in µm over the
slide layer (:mod:`napari_he2rna.maps.map_display`). Errors a user can act on
(:class:`~napari_he2rna.errors.He2rnaError`) become notifications, never tracebacks.

**Progressive painting.** Run extracts the tiles in a spread order (a coarse lattice first,
:mod:`napari_he2rna.maps.progressive`) and the picked gene's heatmap fills in while the extraction goes on:
tiles not extracted yet show their nearest extracted tile's value, so the whole slide has a coarse map after
the first ~1/16 of the tiles. The picker works during the run; Cancel keeps what is painted (the features go
to the cache as they arrive, so the next Run resumes).

**One heatmap layer per slide.** Picking another gene updates that layer's data in place (one dot product
per fold from the session's cached hidden layers); **Pin** keeps a copy of it as its own layer (for side by
side or grid view). **Fold spread** adds a second layer, the standard deviation of the fold models' tile
scores. The picker shows each gene's validation R from the bundle (per cancer type or averaged) and marks
the reliable ones (:mod:`napari_he2rna.maps.readout`); hovering a heatmap shows the tile's scores for every
painted name and the Compare tab's truth value in the status bar.

After a run the worker also compares the slide with the model's training data
(:mod:`napari_he2rna.model.ood`): when it is outside (or predictions leave the training targets' range) a
red label in the Run box says so, and the gene box offers "feature distance (to training data)", painted
like a gene.

The dock composes its three boxes and the layers they draw: :class:`._model_picker.ModelPicker` (slide,
model, device), :class:`._run_section.RunSection` (Run / Cancel / progress and the worker),
:class:`._gene_picker.GenePicker` (genes, R, Pin, fold spread, gene sets) and
:class:`._heatmap_layers.HeatmapLayers` (tile outline, heatmap and spread layers). The boxes' widgets are
reachable from the dock under their old names (``widget.run_button``, ``widget.gene_combo``, ...).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..errors import He2rnaError
from ..maps import gene_sets, readout
from ..maps.gene_sets import DISTANCE_NAME
from ..maps.session import default_model_path
from ..model import ood
from ._gene_picker import GenePicker
from ._heatmap_layers import HeatmapLayers, tile_outline
from ._model_picker import DEMO_WARNING, ModelPicker
from ._run_section import RunSection
from ._state import SlideState, get_registry, layer_info

if TYPE_CHECKING:
    import napari

    from ..model.bundle import ModelBundle

#: ``DEMO_WARNING`` (the model box's) and ``tile_outline`` (the layers') stay importable from here.
__all__ = ["DEMO_WARNING", "ModelWidget", "tile_outline"]


# ------------------------------------------------------------------------------------------ the widget
class ModelWidget(QWidget):
    """Model bundle, device, Run/Cancel, and the gene picker that paints heatmap layers.

    Parameters
    ----------
    napari_viewer
        The viewer (napari passes it to dock widgets).
    model_path
        The model to preselect; default the bundled demo model (:func:`session.default_model_path`).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, model_path: str | Path | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.registry = get_registry(napari_viewer)
        self.bundle: ModelBundle | None = None

        self.heatmaps = HeatmapLayers(napari_viewer, self.registry, lambda: self.cancer_type)
        self.model_box = ModelPicker(napari_viewer)
        self.run_box = RunSection(self.registry, self.heatmaps)
        self.gene_box = GenePicker()
        # The boxes' widgets under the dock's names, as before the split (tests, benchmarks, scripts).
        self.slide_picker = self.model_box.slide_picker
        self.model_combo = self.model_box.model_combo
        self.open_model_button = self.model_box.open_model_button
        self.model_label = self.model_box.model_label
        self.demo_label = self.model_box.demo_label
        self.device_combo = self.model_box.device_combo
        self.run_button = self.run_box.run_button
        self.cancel_button = self.run_box.cancel_button
        self.progress_bar = self.run_box.progress_bar
        self.status_label = self.run_box.status_label
        self.ood_label = self.run_box.ood_label
        self.gene_model = self.gene_box.gene_model
        self.gene_combo = self.gene_box.gene_combo
        self.completer = self.gene_box.completer
        self.paint_button = self.gene_box.paint_button
        self.pin_button = self.gene_box.pin_button
        self.spread_check = self.gene_box.spread_check
        self.type_combo = self.gene_box.type_combo
        self.sort_check = self.gene_box.sort_check
        self.reliable_check = self.gene_box.reliable_check
        self.r_label = self.gene_box.r_label
        self.set_edit = self.gene_box.set_edit
        self.add_set_button = self.gene_box.add_set_button

        layout = QVBoxLayout(self)
        layout.addWidget(self.model_box)
        layout.addWidget(self.run_box)
        layout.addWidget(self.gene_box)
        layout.addStretch(1)
        self._connect()
        self._fill_models(model_path)
        self._slide_changed()

    # ------------------------------------------------------------------ wiring
    def _connect(self) -> None:
        self.slide_picker.changed.connect(self._slide_changed)
        self.model_box.model_opened.connect(self.load_model)
        self.model_combo.activated.connect(self._model_combo_activated)
        self.run_button.clicked.connect(self.run)
        self.run_box.paint_pending.connect(self.paint)
        self.run_box.ready.connect(self._run_ready)
        self.gene_box.paint_requested.connect(self.paint)
        self.pin_button.clicked.connect(lambda: self.pin())
        self.spread_check.toggled.connect(self._spread_toggled)
        self.type_combo.currentIndexChanged.connect(lambda *_: self._gene_display_changed())
        self.sort_check.toggled.connect(lambda *_: self.refresh_genes())
        self.reliable_check.toggled.connect(lambda *_: self.refresh_genes())
        self.add_set_button.clicked.connect(lambda: self.add_gene_set(self.set_edit.text()))
        self.set_edit.returnPressed.connect(lambda: self.add_gene_set(self.set_edit.text()))
        self.registry.changed.connect(self._registry_changed)

    # ------------------------------------------------------------------ model
    def _fill_models(self, model_path: str | Path | None) -> None:
        default = default_model_path()
        if default.is_file():
            self.model_combo.addItem(f"demo model ({default.name})", str(default))
        if model_path is not None:
            self.load_model(model_path)
        elif default.is_file():
            self.load_model(default)
        else:
            self.model_label.setText(
                f"The bundled demo model is not there ({default}); create it (see the README) or open a "
                "model bundle."
            )

    def load_model(self, path: str | Path) -> ModelBundle | None:
        """Load a model bundle and make it the current model (errors as notifications)."""
        from ..features.backbones import import_backbone_libraries
        from ..model.bundle import load_bundle

        path = Path(path)
        try:
            bundle = load_bundle(path)
        except He2rnaError as exc:
            show_error(str(exc))
            return None
        self.bundle = bundle
        # The backbone's libraries load while the user picks a slide and presses Run (torchvision: ~2 s).
        threading.Thread(
            target=import_backbone_libraries, args=(bundle.backbone,), name="he2rna-imports", daemon=True
        ).start()
        self.model_box.show_bundle(path, bundle)
        self.gene_box.show_bundle(bundle)
        self.refresh_genes()
        self.update_assessment()
        return bundle

    def _model_combo_activated(self, index: int) -> None:
        path = self.model_combo.itemData(index)
        if path and (self.bundle is None or str(getattr(self.bundle, "path", "")) != str(path)):
            self.load_model(path)

    # ------------------------------------------------------------------ slide state
    @property
    def slide_layer(self):
        """The slide layer the widget works on (None when no slide is open)."""
        return self.slide_picker.value

    def current_state(self) -> SlideState | None:
        """The picked slide's state (created on first use), or None."""
        layer = self.slide_layer
        if layer is None or layer not in self.viewer.layers:
            return None
        return self.registry.state_for(layer)

    def _slide_changed(self, *_: Any) -> None:
        self.current_state()  # a slide layer picked gets its session
        self.refresh_genes()
        self.update_assessment()
        self._update_buttons()

    def update_assessment(self) -> ood.OODAssessment | None:
        """Show how the picked slide compares with the current model's training data (after a Run).

        Red text when the slide is outside (its scores are not predictions), grey when it is within or the
        check is unavailable, hidden before a run. Returns the assessment shown, or None.
        """
        state = self.current_state()
        session = state.session if state is not None else None
        assessment = (
            session.cached_assessment
            if session is not None and session.ready and session.bundle is self.bundle
            else None
        )
        self.run_box.show_assessment(assessment)
        return assessment

    def _registry_changed(self) -> None:
        self._update_buttons()

    @property
    def worker(self):
        """The napari worker of the run in flight (None when idle)."""
        return self.run_box.worker

    @property
    def running(self) -> bool:
        return self.run_box.running

    def _update_buttons(self) -> None:
        self.run_box.update_buttons()

    # ------------------------------------------------------------------ run / cancel
    def run(self):
        """Compute the picked slide's features for the current model in a worker; returns the worker."""
        if self.running:
            show_info("A run is already going; cancel it or wait for it to finish.")
            return None
        state = self.current_state()
        if state is None:
            show_error("Open a slide first (File > Open, or the Slide widget).")
            return None
        if self.bundle is None:
            show_error("Choose a model bundle first (Open model…).")
            return None
        session = state.session
        if session.bundle is not self.bundle:
            session.set_model(self.bundle)
        return self.run_box.start(state, self.bundle, self.device_combo.currentText())

    def cancel(self) -> None:
        """Ask the run in flight to stop (it stops at the next batch; nothing half-made is kept)."""
        self.run_box.cancel()

    def _run_ready(self, state: SlideState) -> None:
        """A run ended with the features ready: the gene list, the training-data check and the heatmaps."""
        self.refresh_genes()
        self.update_assessment()
        self._repaint(state)

    # ------------------------------------------------------------------ layers
    def active_layer(self, state: SlideState, kind: str = "heatmap"):
        """The slide's one active layer of ``kind`` (``"heatmap"`` or ``"uncertainty"``), or None."""
        return self.heatmaps.active_layer(state, kind)

    def heatmap_layer(self, state: SlideState, name: str):
        """The heatmap layer showing ``name`` for a slide (the active one first, then pinned), or None."""
        return self.heatmaps.heatmap_layer(state, name)

    @property
    def cancer_type(self) -> str | None:
        return self.gene_box.cancer_type

    def paint(self, name: str, state: SlideState | None = None):
        """Paint a gene or gene set on the picked slide: the slide's one heatmap layer shows it (its data is
        updated in place; the first pick adds it). During a run, before the first tiles, the pick is kept and
        painted as they arrive.

        Returns the layer, or None after an error notification (unknown gene, not run yet, ...).
        """
        state = state if state is not None else self.current_state()
        if state is None:
            show_error("Open a slide first, then press Run.")
            return None
        session = state.session
        if not session.painted:
            if state.running and session.bundle is not None:
                try:
                    state.extra["gene"] = session.canonical(name)
                except He2rnaError as exc:
                    show_error(str(exc))
                    return None
                self.status_label.setText(
                    f"{state.extra['gene']} is painted as soon as the first tiles arrive."
                )
                return None
            show_error(f"Press Run on {state.layer.name} first: heatmaps need its tile features.")
            return None
        heatmaps = self.heatmaps
        try:
            canonical = session.canonical(name)
            view, seen = heatmaps.map_content(state, canonical, "heatmap")
        except He2rnaError as exc:
            show_error(str(exc))
            return None
        for w in seen:
            if issubclass(w.category, gene_sets.PartialGeneSetWarning):
                show_warning(str(w.message))
        state.extra["gene"] = canonical
        layer = heatmaps.active_layer(state)
        if layer is None:
            layer = heatmaps.add_view(state, view, "active", heatmaps.layer_title(state, canonical))
        else:
            heatmaps.update_layer(state, layer, canonical, "heatmap", view=view)
        if self.spread_check.isChecked():
            heatmaps.paint_spread(state, canonical)
        heatmaps.show_colorbar(layer)
        if self.viewer.layers.selection.active is not layer:
            self.viewer.layers.selection.active = layer
        if session.ready:
            self.status_label.setText(f"Painted {canonical}: {view.units}.")
        else:  # the run goes on: the map fills in as the tiles arrive
            self.status_label.setText(f"Painting {canonical} as the tiles arrive…")
        self.registry.changed.emit()
        return layer

    def paint_uncertainty(self, name: str | None = None, state: SlideState | None = None):
        """Paint the fold spread of ``name`` (default: the picked gene) on the slide; returns the layer."""
        state = state if state is not None else self.current_state()
        if state is None or not state.session.painted:
            show_error("Press Run first: the fold spread needs the slide's tile features.")
            return None
        name = name or state.extra.get("gene")
        if not name:
            show_error("Pick a gene first, then its fold spread can be painted.")
            return None
        try:
            name = state.session.canonical(name)
        except He2rnaError as exc:
            show_error(str(exc))
            return None
        return self.heatmaps.paint_spread(state, name)

    def _spread_toggled(self, on: bool) -> None:
        state = self.current_state()
        if state is None:
            return
        if on:
            if state.session.painted and state.extra.get("gene"):
                self.paint_uncertainty(state=state)
        else:
            for layer in self.registry.layers_of(state, "uncertainty"):
                self.viewer.layers.remove(layer)

    def pin(self, state: SlideState | None = None):
        """Keep a copy of the slide's active heatmap as its own layer; returns it (None with a message)."""
        return self.heatmaps.pin(state if state is not None else self.current_state())

    def _repaint(self, state: SlideState) -> None:
        """Recompute a slide's heatmaps after a run (the model may have changed); pinned copies too."""
        for layer in [
            *self.registry.layers_of(state, "heatmap"),
            *self.registry.layers_of(state, "uncertainty"),
        ]:
            info = layer_info(layer) or {}
            name = info.get("name")
            if name and not self.heatmaps.update_layer(state, layer, name, info.get("kind", "heatmap")):
                self.viewer.layers.remove(layer)
        name = state.extra.get("gene")
        if name and self.active_layer(state) is None:
            self.paint(name, state)

    # ------------------------------------------------------------------ genes
    def choices(self) -> list[str]:
        """What the gene box offers: gene sets (built-in, then the user's), then the model's genes."""
        state = self.current_state()
        if state is not None and state.session.bundle is not None and state.session.bundle is self.bundle:
            return state.session.choices()
        if self.bundle is None:
            return []
        first = [DISTANCE_NAME] if ood.bundle_reference(self.bundle) is not None else []
        sets = [*gene_sets.GENE_SETS, *[s for s in self.registry.gene_sets if s not in gene_sets.GENE_SETS]]
        return [*first, *sets, *self.bundle.genes]

    def refresh_genes(self) -> None:
        """Refill the gene box (keeps what is typed): each gene with its validation R and mark, sorted or
        filtered by R when asked."""
        bundle = self.bundle
        thr, _ = readout.reliable_threshold(bundle, self.cancer_type)
        entries = readout.picker_entries(
            bundle,
            self.choices(),
            self.cancer_type,
            sort_by_r=self.sort_check.isChecked(),
            min_r=thr if self.reliable_check.isChecked() else None,
        )
        self.gene_box.show_entries(entries)

    def _gene_display_changed(self) -> None:
        """Another cancer type: the picker's R and the painted layers' names follow."""
        if self.bundle is not None:
            _, how = readout.reliable_threshold(self.bundle, self.cancer_type)
            self.r_label.setText(f"R: cross-validated correlation per gene; {readout.MARK} = {how}.")
        self.refresh_genes()
        for state in self.registry.states():
            for kind in ("heatmap", "uncertainty"):
                layer = self.active_layer(state, kind)
                if layer is not None:
                    layer.name = self.heatmaps.layer_title(state, layer_info(layer)["name"], kind)

    def add_gene_set(self, spec: str) -> list[str]:
        """Add user gene sets from ``"name=G1+G2+G3"`` (several with ``;``) and paint them if possible.

        Returns the names added (empty after an error notification).
        """
        if not spec.strip():
            return []
        try:
            # a set named like a gene of the model is refused here, when it is added, not when it is painted
            model_genes = self.bundle.genes if self.bundle is not None else None
            parsed = gene_sets.parse_gene_sets(spec.strip(), model_genes)
        except He2rnaError as exc:
            show_error(str(exc))
            return []
        self.registry.add_gene_sets(parsed)
        self.set_edit.clear()
        self.refresh_genes()
        state = self.current_state()
        if state is not None and state.session.painted:
            for name in parsed:
                self.paint(name, state)
        return list(parsed)
