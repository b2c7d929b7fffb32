"""The default model of ``he2rna train`` (``--model-type ensemble``): HE2RNA and its linear baseline averaged.

Each fold's model scores a tile with ``(1 - w) x HE2RNA(x) + w x linear(x)`` (``w`` = :data:`LINEAR_WEIGHT`,
one half) and predicts a slide with HE2RNA's aggregation of those tile scores (the mean over k of the top-k
means). On 40–60-slide planted-truth cohorts this ensemble was the only rule that recovered at least as many
planted genes as the ridge baseline summed over six cohort and fold draws, where HE2RNA alone and every
per-gene choice between the two fell behind it (``docs/training.md``, "HE2RNA and its linear baseline").
Its tile maps lie between the two models' (the linear map follows the cell counts best).
"""

from __future__ import annotations

import torch
from torch import nn

from .network import HE2RNA

#: The linear baseline's share of every tile score in the ensemble.
LINEAR_WEIGHT = 0.5


class Blend(nn.Module):
    """``(1 - weight) * mlp(x) + weight * linear(x)`` per tile, for every gene.

    Parameters
    ----------
    mlp
        A fold's :class:`HE2RNA` (raw features in).
    linear
        The same fold's linear baseline, a one-layer :class:`HE2RNA` with the same genes (raw features in).
    weight
        The linear model's share, in (0, 1].
    """

    def __init__(self, mlp: HE2RNA, linear: HE2RNA, weight: float = LINEAR_WEIGHT) -> None:
        super().__init__()
        if linear.hidden or linear.n_genes != mlp.n_genes or linear.input_dim != mlp.input_dim:
            raise ValueError("the linear model must be one layer with the MLP's inputs and genes")
        if not 0.0 < float(weight) <= 1.0:
            raise ValueError(f"the linear weight must lie in (0, 1], not {weight}")
        self.mlp, self.linear, self.weight = mlp, linear, float(weight)
        self.input_dim, self.n_genes = mlp.input_dim, mlp.n_genes

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tile scores ``(B, n_genes, N)`` (padded tiles 0, as :meth:`HE2RNA.forward`)."""
        return (1.0 - self.weight) * self.mlp(x, mask) + self.weight * self.linear(x, mask)
