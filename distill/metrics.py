"""Measures used to compare a parallel student with its autoregressive teacher.

* ``teacher_scores``: teacher-forced negative log-likelihood (bits/token) of given windows under
  the teacher, and the entropy (bits) of the teacher's predictive distribution along them.
* ``codebook_usage`` / ``unigram_entropy_bits``: distinct codes, and the entropy of the codes'
  empirical distribution (low values reveal collapse onto a few codes).
* ``mr_stft_distance``: multi-resolution STFT distance between two batches of audio.
* ``CallCounter``: counts a module's forward calls (sequential passes of a sampler).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

BITS = 1.0 / math.log(2.0)


@torch.no_grad()
def teacher_scores(prior, codes: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor | None,
                   batch_size: int = 16) -> tuple[float, float]:
    """Mean teacher NLL of ``codes`` (S, n_ctx) and mean entropy of the teacher's predictive
    distribution at those positions, both in bits per token (temperature 1).

    upper: (S, n_ctx // cond_downsample); labels: (S, label_len) or None."""
    dev = prior.prior.x_emb.weight.device
    nll = ent = 0.0
    count = 0
    for i in range(0, codes.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        z = codes[sl].to(dev)
        y = None if labels is None else labels[sl].to(dev)
        logp = torch.log_softmax(prior.logits(z, upper[sl].to(dev), y).float(), dim=-1)  # (B, T, V)
        nll += float(-logp.gather(-1, z[..., None]).sum())
        ent += float(-(logp.exp() * logp).sum())
        count += z.numel()
    return nll / count * BITS, ent / count * BITS


def codebook_usage(codes: torch.Tensor) -> int:
    """Number of distinct codes in ``codes`` (any shape)."""
    return int(torch.unique(codes).numel())


def unigram_entropy_bits(codes: torch.Tensor, l_bins: int) -> float:
    """Entropy (bits) of the empirical code distribution of ``codes`` (any shape)."""
    counts = torch.bincount(codes.reshape(-1).long().cpu(), minlength=l_bins).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def default_fft_sizes(length: int, count: int = 3) -> tuple[int, ...]:
    """Up to ``count`` power-of-two FFT sizes from 2048 down, each at most half of ``length``."""
    sizes = [s for s in (2048, 1024, 512, 256, 128, 64, 32, 16) if s <= length // 2][:count]
    if not sizes:
        raise ValueError(f"audio of {length} samples is too short for a spectral distance (needs >= 32)")
    return tuple(sizes)


def _magnitude(x: torch.Tensor, n_fft: int) -> torch.Tensor:
    win = torch.hann_window(n_fft, dtype=torch.float32, device=x.device)
    return torch.stft(x.float(), n_fft, hop_length=max(n_fft // 4, 1), window=win, center=True,
                      return_complex=True).abs()                                   # (N, F, frames)


def mr_stft_distance(a: torch.Tensor, b: torch.Tensor, fft_sizes: tuple[int, ...] | None = None,
                     eps: float = 1e-5) -> torch.Tensor:
    """Per-row multi-resolution STFT distance between audio ``a`` and ``b`` (N, T) -> (N,).

    At each FFT size: symmetric spectral convergence ``||A - B|| / (0.5 (||A|| + ||B||))`` plus the
    mean absolute difference of log magnitudes; averaged over sizes. Zero iff the spectra agree."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"audio batches must both be (N, T); got {tuple(a.shape)} and {tuple(b.shape)}")
    sizes = fft_sizes or default_fft_sizes(a.shape[1])
    total = torch.zeros(a.shape[0], dtype=torch.float32, device=a.device)
    for n_fft in sizes:
        A, B = _magnitude(a, n_fft), _magnitude(b, n_fft)
        norm = 0.5 * (A.flatten(1).norm(dim=1) + B.flatten(1).norm(dim=1))
        sc = (A - B).flatten(1).norm(dim=1) / (norm + eps)
        logmag = ((A + eps).log() - (B + eps).log()).abs().flatten(1).mean(dim=1)
        total += sc + logmag
    return total / len(sizes)


class CallCounter:
    """Counts forward calls of ``module`` while active (``with CallCounter(m) as c: ...; c.count``)."""

    def __init__(self, module: nn.Module):
        self.module, self.count, self._handle = module, 0, None

    def _hook(self, *_):
        self.count += 1

    def __enter__(self) -> "CallCounter":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
