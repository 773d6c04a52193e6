"""Audio reconstruction losses of the VQ-VAE family: L1/L2 on samples and STFT magnitude distances.

Losses are divided by data "bandwidths" (:func:`estimate_bandwidth`: sample variance, mean
absolute value and the mean norm of an STFT magnitude), so their scale does not depend on how
loud the training audio is. All STFTs run in float32 even under mixed precision.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["STFTSpec", "DEFAULT_STFT", "MULTI_STFT", "stft_magnitude", "spectral_distance",
           "multispectral_distance", "spectral_convergence", "estimate_bandwidth"]


@dataclass(frozen=True)
class STFTSpec:
    n_fft: int
    hop_length: int
    window: int


DEFAULT_STFT = STFTSpec(2048, 256, 1536)
MULTI_STFT = (STFTSpec(2048, 240, 1200), STFTSpec(1024, 120, 600), STFTSpec(512, 50, 240))


def stft_magnitude(x: torch.Tensor, spec: STFTSpec) -> torch.Tensor:
    """x: (N, T) audio -> (N, n_fft // 2 + 1, frames) float32 magnitudes (Hann window, centred)."""
    x = x.float()
    if x.shape[-1] <= spec.n_fft // 2:
        raise ValueError(f"audio windows of {x.shape[-1]} samples are too short for an STFT with n_fft="
                         f"{spec.n_fft}; use windows longer than {spec.n_fft // 2} samples")
    window = torch.hann_window(spec.window, device=x.device)
    return torch.stft(x, spec.n_fft, spec.hop_length, spec.window, window, return_complex=True).abs()


def _norm(x: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm: (N, ...) -> (N,)."""
    return x.reshape(x.shape[0], -1).pow(2).sum(-1).sqrt()


def spectral_distance(target: torch.Tensor, pred: torch.Tensor, spec: STFTSpec = DEFAULT_STFT) -> torch.Tensor:
    """(N,) norm of the difference of the STFT magnitudes."""
    return _norm(stft_magnitude(target, spec) - stft_magnitude(pred, spec))


def multispectral_distance(target: torch.Tensor, pred: torch.Tensor, specs=MULTI_STFT,
                           target_mags: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(N,) mean of :func:`spectral_distance` over several resolutions. ``target_mags``: the
    target's magnitudes per resolution when already computed (they are shared by all levels)."""
    if target_mags is None:
        target_mags = [stft_magnitude(target, s) for s in specs]
    return sum(_norm(m - stft_magnitude(pred, s)) for m, s in zip(target_mags, specs)) / len(specs)


def spectral_convergence(target: torch.Tensor, pred: torch.Tensor, spec: STFTSpec = DEFAULT_STFT,
                         eps: float = 2e-3) -> torch.Tensor:
    """(N,) ``||S(target) - S(pred)|| / ||S(target)||`` (0 where the target is silent)."""
    s_t = stft_magnitude(target, spec)
    ref = _norm(s_t)
    res = _norm(s_t - stft_magnitude(pred, spec))
    return res * (ref > eps).float() / ref.clamp(min=eps)


@torch.no_grad()
def estimate_bandwidth(batches) -> dict[str, float]:
    """``l2`` (variance), ``l1`` (mean |x|) and ``spec`` (mean STFT-magnitude norm per window) of
    audio batches (an iterable of (N, T) tensors). Values are floored so silence cannot divide
    by zero."""
    n = total = total_sq = l1 = 0.0
    spec_sum, spec_n = 0.0, 0
    for x in batches:
        x = x.double()
        n += x.numel()
        total += float(x.sum())
        total_sq += float((x * x).sum())
        l1 += float(x.abs().sum())
        spec_sum += float(_norm(stft_magnitude(x.float(), DEFAULT_STFT)).sum())
        spec_n += x.shape[0]
    if n == 0:
        raise ValueError("no audio to estimate the loss bandwidths from")
    mean = total / n
    return dict(l2=max(total_sq / n - mean * mean, 1e-8), l1=max(l1 / n, 1e-6), spec=max(spec_sum / spec_n, 1e-6))
