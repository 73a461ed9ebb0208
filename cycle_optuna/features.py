"""Per-series summary features: what the MLP reference baseline sees, and the model's optional
summary branch (``summary_features = true``) adds to its pooled vector.

Torch only (no data or Optuna imports), so the model can use it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

N_SEGMENTS = 8  # piecewise means per channel: the coarse shape of a series
N_FREQS = 8  # lowest non-constant Fourier magnitudes per channel
MAX_LAG = 2  # cross-channel correlations at lags -2..2
MAX_PAIR_CHANNELS = 16  # above this many channels the pairwise correlations are left out (F^2 features)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each series' mean and variance per feature over its present steps: two [N, 1, F] tensors."""
    present = ~torch.isnan(x)
    count = present.sum(1, keepdim=True).clamp_min(1)
    zero = torch.zeros((), dtype=x.dtype)
    mean = torch.where(present, x, zero).sum(1, keepdim=True) / count
    return mean, (torch.where(present, x - mean, zero) ** 2).sum(1, keepdim=True).div(count)


def z_normalise(x: torch.Tensor) -> torch.Tensor:
    """Each series' features standardised over its own present steps ([N, T, F]; NaN stays NaN).

    The UCR archive's convention: what is left is the shape, not the level or the gain, so a
    recording's offset or gain does not decide what it is compared with. A constant feature becomes
    zeros."""
    mean, var = _moments(x)
    std = var.sqrt()
    return (x - mean) / torch.where(std > 1e-8, std, torch.ones((), dtype=x.dtype))


def level_and_scale(x: torch.Tensor) -> torch.Tensor:
    """Each series' mean and log standard deviation per feature over its present steps: [N, 2F]."""
    mean, var = _moments(x)
    return torch.cat((mean[:, 0], 0.5 * torch.log(var[:, 0] + 1e-10)), dim=1)


def shape_summary(x: torch.Tensor) -> torch.Tensor:
    """summary_features of each series z-normalised (its shape), then its level and scale
    (level_and_scale): [N, D + 2F]. What a recording's offset or gain changes is two figures per
    feature instead of nearly every statistic."""
    return torch.cat((summary_features(z_normalise(x)), level_and_scale(x)), dim=1)


def summary_features(x: torch.Tensor) -> torch.Tensor:
    """Per-series features [N, D] of normalised series [N, T, F], NaN-safe (NaN = missing step).

    Per channel: mean, std, min, max, first and last observed value, linear slope, mean and std of
    the step-to-step change, lag-1 autocorrelation, positions of the max and min, observed fraction,
    ``N_SEGMENTS`` segment means and ``N_FREQS`` Fourier magnitudes; between channels (up to
    ``MAX_PAIR_CHANNELS``): correlations at lags -MAX_LAG..MAX_LAG.
    """
    x = x.double()
    n, t, f = x.shape
    obs = ~torch.isnan(x)
    cnt = obs.sum(1).clamp(min=1)
    z = torch.where(obs, x, torch.zeros((), dtype=x.dtype))
    mean = z.sum(1) / cnt
    dev = torch.where(obs, x - mean[:, None], torch.zeros((), dtype=x.dtype))
    std = (dev.pow(2).sum(1) / cnt).sqrt()
    inf = torch.tensor(math.inf, dtype=x.dtype)
    mx = torch.where(obs, x, -inf).amax(1)
    mn = torch.where(obs, x, inf).amin(1)
    steps = torch.arange(t, dtype=x.dtype)[None, :, None].expand(n, t, f)
    pos = torch.where(obs, steps, torch.full((), float(t), dtype=x.dtype))
    first_i = pos.amin(1).long().clamp(max=t - 1)
    last_i = torch.where(obs, steps, torch.full((), -1.0, dtype=x.dtype)).amax(1).long().clamp(min=0)
    first = z.gather(1, first_i[:, None]).squeeze(1)
    last = z.gather(1, last_i[:, None]).squeeze(1)
    tt = torch.where(obs, steps / max(1, t - 1), torch.zeros((), dtype=x.dtype))
    t_mean = tt.sum(1) / cnt
    t_dev = torch.where(obs, tt - t_mean[:, None], torch.zeros((), dtype=x.dtype))
    slope = (t_dev * dev).sum(1) / t_dev.pow(2).sum(1).clamp(min=1e-12)
    both = obs[:, 1:] & obs[:, :-1]
    nb = both.sum(1).clamp(min=1)
    diff = torch.where(both, z[:, 1:] - z[:, :-1], torch.zeros((), dtype=x.dtype))
    d_mean = diff.abs().sum(1) / nb
    d_std = ((diff.pow(2).sum(1) / nb) - (diff.sum(1) / nb).pow(2)).clamp(min=0).sqrt()
    ac1 = (torch.where(both, dev[:, 1:] * dev[:, :-1], torch.zeros((), dtype=x.dtype)).sum(1) / nb) \
        / std.pow(2).clamp(min=1e-12)
    argmax = torch.where(obs & (x == mx[:, None]), steps, torch.full((), float(t), dtype=x.dtype)).amin(1) / t
    argmin = torch.where(obs & (x == mn[:, None]), steps, torch.full((), float(t), dtype=x.dtype)).amin(1) / t
    frac = obs.sum(1).to(x.dtype) / t
    segs = []
    for idx in np.array_split(np.arange(t), min(N_SEGMENTS, t)):
        seg_obs = obs[:, idx]
        segs.append(z[:, idx].sum(1) / seg_obs.sum(1).clamp(min=1))
    spec = torch.fft.rfft(z, dim=1).abs()[:, 1:N_FREQS + 1] / math.sqrt(t)  # [N, <=N_FREQS, F]
    feats = [mean, std, mn, mx, first, last, slope, d_mean, d_std, ac1, argmax, argmin, frac, *segs,
             spec.reshape(n, -1)]
    if 2 <= f <= MAX_PAIR_CHANNELS:
        zs = dev / std[:, None].clamp(min=1e-12)
        iu = torch.triu_indices(f, f, offset=1)
        for lag in range(-MAX_LAG, MAX_LAG + 1):
            if abs(lag) >= t:
                continue
            a, b = (zs[:, :t - lag], zs[:, lag:]) if lag >= 0 else (zs[:, -lag:], zs[:, :t + lag])
            c = torch.einsum("ntf,ntg->nfg", a, b) / cnt.min(1).values[:, None, None]
            feats.append(c[:, iu[0], iu[1]])
    out = torch.cat([v.reshape(n, -1) for v in feats], dim=1)
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).float()
