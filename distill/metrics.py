"""Measures used to compare a parallel student with its autoregressive teacher.

* ``teacher_scores``: teacher-forced negative log-likelihood (bits/token) of given windows under
  the teacher, and the entropy (bits) of the teacher's predictive distribution along them;
  ``teacher_token_scores`` the same per token.
* ``codebook_usage`` / ``unigram_entropy_bits``: distinct codes, and the entropy of the codes'
  empirical distribution (low values reveal collapse onto a few codes).
* ``next_token_tv``: total variation between the student's and the teacher's next-token
  distributions along teacher samples (the rejection rate of an exact speculative verifier).
* ``code_histogram`` / ``histogram_tv``: code counts and the distance between two of them.
* ``mr_stft_distance``: multi-resolution STFT distance between two batches of audio.
* ``CallCounter``: counts a module's forward calls (sequential passes of a sampler).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

BITS = 1.0 / math.log(2.0)


@torch.no_grad()
def teacher_token_scores(prior, codes: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor | None,
                         batch_size: int = 16, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token of ``codes`` (S, n_ctx) at positions ``[start, n_ctx)``: the teacher-forced NLL
    under the teacher and the entropy of the teacher's predictive distribution there, both in bits
    (temperature 1); two float64 CPU tensors (S, n_ctx - start).

    upper: (S, n_ctx // cond_downsample); labels: (S, label_len) or None."""
    dev = prior.device
    nll, ent = [], []
    for i in range(0, codes.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        z = codes[sl].to(dev)
        y = None if labels is None else labels[sl].to(dev)
        logp = torch.log_softmax(prior.logits(z, upper[sl].to(dev), y).float(), dim=-1)[:, start:]  # (B, T', V)
        nll.append(-logp.gather(-1, z[:, start:, None])[..., 0].double().cpu())
        ent.append(-(logp.exp() * logp).sum(-1).double().cpu())
    return torch.cat(nll) * BITS, torch.cat(ent) * BITS


def teacher_scores(prior, codes: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor | None,
                   batch_size: int = 16, start: int = 0) -> tuple[float, float]:
    """Mean teacher NLL of ``codes`` (S, n_ctx) and mean entropy of the teacher's predictive
    distribution at those positions, both in bits per token, over positions ``[start, n_ctx)``
    (a hopped window's new part: ``start`` = its known length); see ``teacher_token_scores``."""
    nll, ent = teacher_token_scores(prior, codes, upper, labels, batch_size, start)
    return float(nll.mean()), float(ent.mean())


@torch.no_grad()
def next_token_tv(prior, student, codes: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor | None, *,
                  known: int, positions: int = 16, generator: torch.Generator | None = None,
                  bins: int = 8) -> dict:
    """Total variation between the student's and the teacher's next-token distributions along
    teacher samples ``codes`` (S, n_ctx), ``1 - sum_v min(p_t(v), q_t(v))``.

    At ``positions`` positions ``t`` per window, drawn uniformly from ``[known, n_ctx)``: ``p_t``
    is the teacher's distribution given codes ``[0, t)`` (teacher-forced), ``q_t`` the student's at
    ``t`` given the same codes with ``[t, n_ctx)`` masked (its prefix layout with the window's
    ``known`` codes when ``student.sampling.prefix_cache``), both at temperature 1. This is the
    rejection rate an exact speculative verifier meets at the first drafted position after an
    accepted prefix. Returns ``mean_tv``, ``stderr`` (over windows), ``profile`` (mean TV in
    ``bins`` equal spans of ``[known, n_ctx)``), ``entropy_student`` / ``entropy_teacher``
    (bits, of q and p at those positions), ``positions``."""
    c = prior.config
    n = c.n_ctx
    if not 0 <= known < n:
        raise ValueError(f"known must be in [0, n_ctx={n}), got {known}")
    dev = prior.device
    prefix_len = known if student.sampling.prefix_cache else 0
    per_window, prof_sum, prof_n = [], torch.zeros(bins, dtype=torch.float64), torch.zeros(bins, dtype=torch.float64)
    ent_p = ent_q = 0.0
    for i in range(codes.shape[0]):
        z = codes[i:i + 1].to(dev)
        u = upper[i:i + 1].to(dev)
        y = None if labels is None else labels[i:i + 1].to(dev)
        logp = torch.log_softmax(prior.logits(z, u, y).float()[0], dim=-1)           # (n, V)
        t = torch.randint(known, n, (positions,), generator=generator).to(dev)        # (m,)
        tokens = z.expand(positions, n).clone()
        tokens[torch.arange(n, device=dev)[None, :] >= t[:, None]] = student.mask_id
        cond = student.condition(u.expand(positions, -1), None if y is None else y.expand(positions, -1))
        logq = torch.log_softmax(student.logits_unchecked(tokens, cond, prefix_len=prefix_len,
                                                          positions=t[:, None])[:, 0], dim=-1)   # (m, V)
        p, q = logp[t].exp(), logq.exp()
        tv = (1.0 - torch.minimum(p, q).sum(-1)).clamp(min=0.0).double().cpu()      # (m,)
        per_window.append(float(tv.mean()))
        b = ((t - known).cpu() * bins // (n - known)).clamp(max=bins - 1)
        prof_sum.index_add_(0, b, tv)
        prof_n.index_add_(0, b, torch.ones_like(tv))
        ent_p += float(-(p * logp[t]).sum())
        ent_q += float(-(q * logq).sum())
    m = torch.tensor(per_window, dtype=torch.float64)
    count = codes.shape[0] * positions
    return dict(mean_tv=float(m.mean()), stderr=float(m.std() / math.sqrt(len(m))) if len(m) > 1 else 0.0,
                profile=(prof_sum / prof_n.clamp(min=1)).tolist(), entropy_teacher=ent_p / count * BITS,
                entropy_student=ent_q / count * BITS, positions=positions)


def code_histogram(codes: torch.Tensor, l_bins: int) -> list[int]:
    """Count of every code in ``codes`` (any shape), ``l_bins`` entries."""
    return torch.bincount(codes.reshape(-1).long().cpu(), minlength=l_bins).tolist()


def histogram_tv(a: list[int], b: list[int]) -> float:
    """Total variation between two code histograms (as distributions), in [0, 1]."""
    pa, pb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(0.5 * (pa / pa.sum() - pb / pb.sum()).abs().sum())


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
