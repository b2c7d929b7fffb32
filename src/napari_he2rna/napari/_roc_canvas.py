"""The ROC panel of the Compare dock: one matplotlib axes per compared score, curves swapped in place."""

from __future__ import annotations

from collections.abc import Mapping

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QSizePolicy

from ..validation import metrics


class RocCanvas:
    """A matplotlib figure in a Qt canvas showing the ROC curves of :mod:`napari_he2rna.validation.metrics`
    results.

    Attributes
    ----------
    figure, canvas
        The figure and its Qt widget (add ``canvas`` to a layout).
    """

    def __init__(self, figsize: tuple[float, float] = (4, 2.6), min_height: int = 220) -> None:
        self.figure = Figure(figsize=figsize, tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(min_height)
        # as wide as the dock, as tall as asked: it does not take the height the tab has to spare
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.canvas.setFixedHeight(min_height)

    def draw(self, results: Mapping[str, metrics.TileMetrics | metrics.AnnotationMetrics]) -> None:
        """One panel per name: the ROC curve of each AUC cut (or inside vs outside), and the chance line."""
        fig = self.figure
        names = list(results)
        if len(fig.axes) != max(len(names), 1) or not names:
            # Building axes is the slow part of matplotlib (tens of ms each): only when the panel count
            # changes; otherwise the curves are swapped on the existing axes.
            fig.clear()
            if not names:
                self.canvas.draw_idle()
                return
            for ax in fig.subplots(1, len(names), squeeze=False)[0]:
                ax.set_xlabel("false positive rate", fontsize=8)
                ax.set_ylabel("true positive rate", fontsize=8)
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1)
                ax.tick_params(labelsize=7)
        for ax, name in zip(fig.axes, names, strict=True):
            for artist in list(ax.lines):
                artist.remove()
            if ax.get_legend() is not None:
                ax.get_legend().remove()
            ax.set_prop_cycle(None)  # the same colour for the same cut in every redraw
            res = results[name]
            ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
            if isinstance(res, metrics.AnnotationMetrics):
                if res.roc is not None:
                    ax.plot(*res.roc, lw=1.5, label=f"inside AUC {res.auc:.2f}")
            else:
                for label, (fpr, tpr) in res.roc.items():
                    ax.plot(fpr, tpr, lw=1.2, label=f"{label} AUC {res.auc[label]:.2f}")
            ax.set_title(name, fontsize=9)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="lower right")
        self.canvas.draw_idle()
