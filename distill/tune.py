"""Choosing a student's unmasking noise (``SamplingDefaults.confidence_noise``) on validation windows.

How much choice noise confidence-based unmasking needs depends on the teacher: with a flat
teacher (high entropy per token) ranking by probability alone gives samples far *more* likely
than the teacher's own, and noise brings them back; with a sharp teacher the same noise lets
incoherent tokens in early and samples become far *less* likely. ``choose_confidence_noise``
lets the student sample windows with every value of a grid and keeps the value with the smallest
sum of two distances to the teacher's own samples of the same windows: the relative gap of their
teacher NLL (bits/token) and the total variation between their code histograms. Two criteria,
so that the choice is not the evaluation's NLL ratio matched alone; with ``known`` > 0 the
windows are hopped ones (their first ``known`` codes are the teacher's, the rest is sampled and
scored), the setting of every window of a level but the first.
``distill.train`` runs it after training on windows of the teacher-sample shards (train data, not
the held-out windows of ``distill.evaluate``), whose teacher samples are already there, and saves
the choice with the student.
"""
from __future__ import annotations

import torch

from .data import sample_windows
from .metrics import code_histogram, histogram_tv, teacher_scores
from .sampler import ParallelWindowSampler

__all__ = ["choose_confidence_noise", "DEFAULT_GRID"]

DEFAULT_GRID = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)


@torch.no_grad()
def choose_confidence_noise(prior, student, teacher_codes: torch.Tensor, upper: torch.Tensor,
                            labels: torch.Tensor | None, *, passes: int = 16, grid=DEFAULT_GRID,
                            temperature: float = 1.0, batch_size: int = 16, seed: int = 0,
                            known: int = 0) -> tuple[float, dict]:
    """Returns ``(noise, report)``; ``report``: ``teacher_nll_teacher``, ``known`` and per grid
    value ``{"confidence_noise", "teacher_nll", "relative_gap", "histogram_tv", "score"}`` (rows in
    grid order; ``score`` = relative_gap + histogram_tv, the smallest is chosen).

    teacher_codes: the teacher's own samples of the windows (S, n_ctx), at ``temperature``;
    upper, labels: the windows' conditioning, (S, n_ctx // cond_downsample) and (S, label_len) or None."""
    grid = [float(g) for g in grid]
    if not grid or any(g < 0 for g in grid):
        raise ValueError(f"the noise grid must hold values >= 0, got {grid}")
    if upper.shape[0] < 1:
        raise ValueError("no validation windows")
    if teacher_codes.shape[0] != upper.shape[0]:
        raise ValueError(f"{teacher_codes.shape[0]} teacher samples for {upper.shape[0]} windows")
    dev = prior.prior.x_emb.weight.device
    n_ctx = prior.config.n_ctx
    bs = min(batch_size, upper.shape[0])
    if not 0 <= known < n_ctx:
        raise ValueError(f"known must be in [0, n_ctx={n_ctx}), got {known}")
    target, _ = teacher_scores(prior, teacher_codes, upper, labels, bs, start=known)
    hist_teacher = code_histogram(teacher_codes[:, known:], prior.config.l_bins)
    prefix = teacher_codes[:, :known] if known else None
    gen = torch.Generator(device=dev)
    rows = []
    for noise in grid:
        sampler = ParallelWindowSampler(student, passes=passes, confidence_noise=noise, temperature_anneal=False)
        gen.manual_seed(seed)
        z = sample_windows(sampler, n_ctx, upper, labels, temperature=temperature, batch_size=bs, generator=gen,
                           device=dev, known=prefix)
        nll, _ = teacher_scores(prior, z, upper, labels, bs, start=known)
        gap = abs(nll - target) / target
        tv = histogram_tv(code_histogram(z[:, known:], prior.config.l_bins), hist_teacher)
        rows.append({"confidence_noise": noise, "teacher_nll": nll, "relative_gap": gap, "histogram_tv": tv,
                     "score": gap + tv})
    best = min(rows, key=lambda r: r["score"])
    return best["confidence_noise"], {"teacher_nll_teacher": target, "passes": passes, "known": known,
                                      "windows": int(upper.shape[0]), "rows": rows,
                                      "criterion": "relative teacher-NLL gap + code-histogram TV"}
