"""The HE2RNA network and its top-k aggregation.

Re-implemented from the Methods of Schmauch et al. (2020), *A deep learning model to predict RNA-Seq
expression of tumours from whole slide images*: an MLP applied to every (super)tile independently
(1D convolutions of kernel 1), ReLU, dropout between layers, one score per tile per gene; a slide's prediction
for a gene is the mean of its k highest tile scores, k drawn from ``L`` at each training step and averaged
over every k in ``L`` at inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

#: The paper's k lists: supertile data (100 per slide) and full-scale data (up to 8,000 tiles per slide).
SUPERTILE_KS: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
FULL_TILE_KS: tuple[int, ...] = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class HE2RNA(nn.Module):
    """The per-tile MLP of HE2RNA.

    Every tile goes through the same layers (a 1D convolution of kernel 1 is a dense layer shared by the
    tiles); ReLU and dropout sit between consecutive layers, the output layer is linear.

    Parameters
    ----------
    input_dim
        Features per tile (2048 for ResNet50).
    n_genes
        Outputs per tile.
    hidden
        Sizes of the hidden layers (paper: ``(1024, 1024)`` for all genes, ``(256, 256)`` for gene subsets).
    dropout
        Dropout probability between layers (paper: 0.25).
    output_bias
        ``(n_genes,)`` initial bias of the output layer, the mean training target, so that training starts
        from the mean expression instead of zero.
    """

    def __init__(
        self,
        input_dim: int,
        n_genes: int,
        hidden: Sequence[int] = (1024, 1024),
        dropout: float = 0.25,
        output_bias: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        self.n_genes = int(n_genes)
        self.hidden = tuple(int(h) for h in hidden)
        self.dropout_p = float(dropout)
        sizes = [self.input_dim, *self.hidden, self.n_genes]
        self.layers = nn.ModuleList(
            nn.Conv1d(a, b, kernel_size=1) for a, b in zip(sizes[:-1], sizes[1:], strict=False)
        )
        self.dropout = nn.Dropout(self.dropout_p)
        if output_bias is not None:
            self.set_output_bias(output_bias)

    def set_output_bias(self, bias: np.ndarray | torch.Tensor) -> None:
        """Set the output layer's bias, ``(n_genes,)`` (e.g. to the mean training target)."""
        bias = torch.as_tensor(np.asarray(bias, dtype=np.float32)).reshape(-1)
        if bias.numel() != self.n_genes:
            raise ValueError(f"output bias has {bias.numel()} values for {self.n_genes} genes")
        with torch.no_grad():
            self.layers[-1].bias.copy_(bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tile scores.

        Parameters
        ----------
        x
            ``(B, input_dim, N)`` tile features.
        mask
            ``(B, N)`` bool, True for real tiles. Padded tiles get a score of 0 (they never enter the top-k
            when :func:`topk_mean` is given the same mask).

        Returns
        -------
        torch.Tensor
            ``(B, n_genes, N)`` one score per gene per tile.
        """
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.dropout(torch.relu(h))
        if mask is not None:
            h = h * mask[:, None, :].to(h.dtype)
        return h

    def predict(self, x: torch.Tensor, mask: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
        """Slide predictions ``(B, n_genes)``: the mean over k in ``ks`` of the top-k mean of tile scores."""
        return topk_mean_multi(self(x, mask), mask, ks)


def _sorted_valid(scores: torch.Tensor, mask: torch.Tensor | None, k_max: int):
    """Top ``k_max`` scores per (slide, gene), sorted descending, padded tiles pushed to the end."""
    b, _, n = scores.shape
    if mask is None:
        mask = torch.ones((b, n), dtype=torch.bool, device=scores.device)
    mask = mask.to(torch.bool)
    # A finite sentinel, not -inf: 0 * -inf would be NaN in the weighted sums below (and in gradients).
    low = torch.finfo(scores.dtype).min
    masked = scores.masked_fill(~mask[:, None, :], low)
    k_max = max(1, min(int(k_max), n))
    top = torch.topk(masked, k_max, dim=2, sorted=True).values  # (B, G, k_max)
    n_valid = mask.sum(dim=1)  # (B,)
    return top, n_valid


def topk_mean(scores: torch.Tensor, mask: torch.Tensor | None, k: int) -> torch.Tensor:
    """Per slide and gene, the mean of the k highest scores of the valid (unpadded) tiles.

    Parameters
    ----------
    scores
        ``(B, G, N)`` tile scores.
    mask
        ``(B, N)`` bool, True for real tiles; ``None`` means all tiles are real.
    k
        How many top tiles to average; when a slide has fewer valid tiles, all of them are averaged.

    Returns
    -------
    torch.Tensor
        ``(B, G)``; NaN for a slide without any valid tile.
    """
    top, n_valid = _sorted_valid(scores, mask, k)
    k_eff = torch.clamp(n_valid, max=int(k))  # (B,)
    pos = torch.arange(top.shape[2], device=scores.device)
    keep = pos[None, :] < k_eff[:, None]  # (B, k)
    total = torch.where(keep[:, None, :], top, torch.zeros_like(top)).sum(dim=2)
    out = total / k_eff.clamp(min=1)[:, None].to(scores.dtype)
    return torch.where((n_valid > 0)[:, None], out, torch.full_like(out, float("nan")))


def topk_mean_multi(scores: torch.Tensor, mask: torch.Tensor | None, ks: Sequence[int]) -> torch.Tensor:
    """Inference aggregation ``(B, G)``: the mean over k in ``ks`` of :func:`topk_mean`.

    One sort and a cumulative sum serve every k, instead of one top-k per k.
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError("ks must be a non-empty list of positive integers")
    top, n_valid = _sorted_valid(scores, mask, max(ks))
    # Zero out sentinel values so the cumulative sum stays finite; they are never indexed below.
    pos = torch.arange(top.shape[2], device=scores.device)
    valid_pos = pos[None, :] < n_valid[:, None]
    top = torch.where(valid_pos[:, None, :], top, torch.zeros_like(top))
    csum = torch.cumsum(top, dim=2)  # (B, G, k_max)
    out = torch.zeros(top.shape[:2], dtype=scores.dtype, device=scores.device)
    for k in ks:
        k_eff = torch.clamp(n_valid, min=1, max=min(k, top.shape[2]))  # (B,)
        idx = (k_eff - 1)[:, None, None].expand(-1, top.shape[1], 1)
        out = out + csum.gather(2, idx)[..., 0] / k_eff[:, None].to(scores.dtype)
    out = out / len(ks)
    return torch.where((n_valid > 0)[:, None], out, torch.full_like(out, float("nan")))
