"""hed-stats: weight-free H&E colour and nucleus statistics (the bundled demo model's backbone).

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbone_base import Backbone

__all__ = ["HedStatsBackbone", "HED_STATS_FEATURES"]

# Names of the "hed-stats" features, in output order (see HedStatsBackbone).
HED_STATS_FEATURES: list[str] = [
    "white_fraction",  # share of near-white pixels (glass, fat vacuoles, lumen): max OD < 0.15
    "h_mean",
    "e_mean",
    "r_mean",  # mean haematoxylin / eosin / residual optical density over the tile
    "h_std",
    "e_std",
    "r_std",  # their standard deviations
    "h_q50",
    "h_q90",
    "h_q99",  # haematoxylin quantiles (dark chromatin drives q90/q99)
    "e_q50",
    "e_q90",  # eosin quantiles (stroma, muscle, cytoplasm)
    "h_tissue_mean",
    "e_tissue_mean",  # means over non-white pixels only (independent of fat/glass share)
    "e_over_h",  # e_tissue_mean / h_tissue_mean: pink stroma high, lymphoid aggregates low
    "h_frac_0.5",
    "h_frac_1.0",
    "h_frac_2.0",  # share of pixels with H above 0.5 (pale nuclei), 1.0, 2.0 (dense)
    "blobs_s_moderate",
    "blobs_m_moderate",
    "blobs_l_moderate",  # maxima of 2x2-mean H per 10k px, H > 0.5,
    "blobs_s_dark",
    "blobs_m_dark",
    "blobs_l_dark",  # in ~6 / 14 / 26 px neighbourhoods; same with H > 1.5
    "nucleus_px",  # pixels with H > 0.5 per moderate medium-scale blob, in hundreds of px:
    #                                 high where nuclei are dark and crowded (lymphoid aggregates), low for
    #                                 isolated nuclei among pale cytoplasm (epithelium) or stroma
    "dark_density_mean",
    "dark_density_max",
    "dark_density_std",  # share of H > 1.5 pixels in 32 px windows:
    #                                 packed lymphoid aggregates (high mean), dispersed lymphocytes (high std)
    "grad_gray",
    "grad_h",  # mean gradient magnitude of grey level and of H (texture, edges)
    "red_tissue",
    "green_tissue",
    "blue_tissue",  # mean RGB (0-1) of non-white pixels
]


class HedStatsBackbone(Backbone):
    """Weight-free colour and nucleus statistics, computed in torch on the batch (fast on CPU).

    Colour deconvolution (Ruifrok & Johnston, scikit-image's ``hed_from_rgb``) of the optical density
    ``-ln(I)`` gives haematoxylin (nuclei), eosin (cytoplasm, stroma) and residual channels; from them the
    features in :data:`HED_STATS_FEATURES`: stain means, spreads and quantiles, how much of the tile is
    white, how much strongly stained chromatin there is, counts of dark blobs (local maxima of smoothed
    haematoxylin) at three scales and two darknesses, a nucleus-size proxy, how packed the dark nuclei are,
    and texture. Dense small dark lymphocytes give many small dark blobs (packed: high dark density
    everywhere; dispersed: high spread of it); large pale epithelial nuclei give moderate, not dark,
    blobs over pale eosin; stroma is eosin-rich with few blobs; fat and glass are white.
    """

    name = "hed-stats"
    dim = len(HED_STATS_FEATURES)
    input_px = 224
    weights_hash = "hed-stats-v1"
    autocast = False  # logs and quantiles in bf16 would move the thresholds

    def __init__(self) -> None:
        super().__init__(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        from skimage.color import hed_from_rgb

        self.register_buffer(
            "_hed_from_rgb", torch.tensor(hed_from_rgb, dtype=torch.float32), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(1.0 / 255.0, 1.0)  # (B, 3, h, w) in [0, 1]
        b = x.shape[0]
        od = -torch.log(x)
        hed = torch.einsum("bchw,cs->bshw", od, self._hed_from_rgb).clamp_min(0.0)
        h, e, r = hed[:, 0], hed[:, 1], hed[:, 2]
        white = (od.amax(dim=1) < 0.15).float()
        tissue = 1.0 - white
        n_tissue = tissue.flatten(1).sum(1).clamp_min(1.0)

        def mean(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(1).mean(1)

        def tissue_mean(t: torch.Tensor) -> torch.Tensor:
            return (t * tissue).flatten(1).sum(1) / n_tissue

        hq = torch.quantile(h.flatten(1), torch.tensor([0.5, 0.9, 0.99], device=x.device), dim=1).T
        eq = torch.quantile(e.flatten(1), torch.tensor([0.5, 0.9], device=x.device), dim=1).T
        h_t, e_t = tissue_mean(h), tissue_mean(e)
        feats = [
            mean(white),
            mean(h),
            mean(e),
            mean(r),
            h.flatten(1).std(1),
            e.flatten(1).std(1),
            r.flatten(1).std(1),
            hq[:, 0],
            hq[:, 1],
            hq[:, 2],
            eq[:, 0],
            eq[:, 1],
            h_t,
            e_t,
            e_t / (h_t + 0.05),
        ]
        feats += [mean((h > t).float()) for t in (0.5, 1.0, 2.0)]

        # Blobs are found at half resolution (a 224 px tile at 0.5 µm/px -> 1 µm/px; a lymphocyte nucleus,
        # ~7 µm, spans ~7 px), 4x cheaper; the 2x2 mean is also the smoothing that merges chromatin specks.
        smooth = F.avg_pool2d(h[:, None], 2)
        # A tiny ramp breaks ties, so a flat saturated plateau gives one peak per window, not one per pixel.
        ramp = torch.arange(smooth.shape[-1], device=x.device, dtype=smooth.dtype) * 1e-6
        smooth = smooth + ramp + ramp[: smooth.shape[-2], None] * smooth.shape[-1]
        per_10k = 1e4 / float(h.shape[-1] * h.shape[-2])  # counts per 10,000 full-resolution pixels
        counts = {}
        for scale, k in (("s", 3), ("m", 7), ("l", 13)):
            # Square max filter as two 1-D passes (max is separable): k + k comparisons per pixel, not k * k.
            local_max = F.max_pool2d(
                F.max_pool2d(smooth, (1, k), stride=1, padding=(0, k // 2)),
                (k, 1),
                stride=1,
                padding=(k // 2, 0),
            )
            is_peak = smooth == local_max
            for level, thr in (("moderate", 0.5), ("dark", 1.5)):
                counts[scale, level] = (is_peak & (smooth > thr)).flatten(1).sum(1).float() * per_10k
        feats += [counts[s, "moderate"] for s in ("s", "m", "l")] + [
            counts[s, "dark"] for s in ("s", "m", "l")
        ]
        nuclear_px = (h > 0.5).float().flatten(1).sum(1)
        feats.append(nuclear_px / (counts["m", "moderate"] / per_10k).clamp_min(1.0) / 100.0)

        density = F.avg_pool2d((smooth > 1.5).float(), 16, stride=8).flatten(1)
        feats += [density.mean(1), density.amax(1), density.std(1)]

        gray = x.mean(1, keepdim=True)
        feats.append(_gradient_energy(gray))
        feats.append(_gradient_energy(h[:, None]))
        feats += [tissue_mean(x[:, c]) for c in range(3)]
        out = torch.stack(feats, dim=1)
        assert out.shape == (b, self.dim)
        return out


def _gradient_energy(img: torch.Tensor) -> torch.Tensor:
    """Mean |finite difference| of a (B, 1, h, w) image, per image."""
    dx = (img[..., :, 1:] - img[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (img[..., 1:, :] - img[..., :-1, :]).abs().flatten(1).mean(1)
    return dx + dy
