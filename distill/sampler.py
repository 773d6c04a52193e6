"""Iterative parallel decoding of one upsampler window with a ``ParallelStudent``.

A window starts with its known codes (the overlap with the previous window) and every new
position masked. Each pass runs the student once, computes output heads only at the positions
still masked, draws a code for each, and keeps the most confident draws (confidence:
log-probability of the drawn code, plus optional annealed Gumbel noise); the others are masked
again, so that the number still masked after pass ``k`` is
``schedules.masks_per_pass(n_new, passes)[k]``. Codes once kept are final, known codes are never
touched. ``passes`` model evaluations decode the window. With ``order="spread"`` a pass instead
makes final the next positions of a fixed order that spreads them evenly over the window
(``schedules.spread_order``), with ``order="random"`` of a random order drawn per window, and
output heads run only at those positions.

With ``prefix_cache`` (students trained with ``distill.prefix_layout``) the known codes run once
per window, and every pass runs only the positions after them against their cached keys and
values; otherwise each pass runs the whole window with full bidirectional attention.

The loop is sync-free: the mask counts are host integers from the schedule, selection is a
``topk`` with a static ``k``, and nothing reads device values back (no ``.item()``, no
``nonzero``). Inputs are validated once, before the loop.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastjukebox.sample_seeds import SampleGenerators, fill_rows
from fastjukebox.sampling import check_window_call
from kernels.sampling.reference import categorical_draw, exponential_noise_, filter_logits

from .schedules import masks_per_pass, pass_temperature, spread_order
from .student import ORDERS, ParallelStudent

__all__ = ["ParallelWindowSampler", "draw_codes"]


def draw_codes(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
          generator, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A code per position from ``softmax(filter(logits / temperature))`` (argmax when the
    temperature is 0) and its log-probability under that distribution (under the filtered
    temperature-1 distribution for argmax).

    logits: (N, T, V) fp32 -> ids (N, T) long, logp (N, T) fp32. ``noise``: a contiguous fp32
    buffer of at least N * T * V elements that the draws' Exp(1) noise is written into (a sampler
    reuses one over its passes instead of allocating it anew); the draws are the same.
    """
    if temperature > 0:
        x = filter_logits(logits / temperature, top_k, top_p)        # a new tensor, ours to overwrite
        logp = torch.log_softmax(x, dim=-1)
        reuse = noise is not None and noise.dtype == logp.dtype and noise.device == logp.device
        e = noise[:logp.numel()].view(logp.shape) if reuse else torch.empty_like(logp)
        fill_rows(e, generator, exponential_noise_)
        ids = categorical_draw(torch.exp(logp, out=x), noise=e, inplace=True)
    else:
        logp = torch.log_softmax(filter_logits(logits, top_k, top_p), dim=-1)
        ids = logp.argmax(dim=-1)
    return ids, logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


class ParallelWindowSampler:
    """Samples one window in ``passes`` student evaluations (``passes`` sequential model calls).

    Args:
        student: a ``ParallelStudent`` (its device and dtype are used).
        passes: model evaluations per window; a window with fewer new positions than ``passes``
            uses one pass per position.
        prefix_cache: run a window's known codes once under the prefix-cached layout
            (``distill.prefix_layout``) and every pass over the other positions only; right for
            students trained with that layout (``student.sampling.prefix_cache``).
        level: the level the sampler is for, checked against the student's (optional).
        temperature_anneal: sample pass ``i`` at ``pass_temperature(temperature, i, passes)``
            (linear from ``temperature`` towards 0) instead of ``temperature`` throughout.
        confidence_noise: scale of the Gumbel noise added to the confidences, annealed linearly
            to 0 over the passes (MaskGIT's choice temperature); 0 ranks by probability alone.
        temperature_scale: codes are drawn at the call's temperature times this (> 0).
        order: ``"confidence"`` (each pass keeps its most confident draws), ``"spread"`` (each
            pass makes final the next positions of ``schedules.spread_order``) or ``"random"``
            (of a random permutation per window); the fixed orders rank nothing, so
            ``confidence_noise`` plays no part in them.

    ``None`` (the default) takes the student's own setting (``student.sampling``, saved with it;
    ``distill.train`` chooses the noise on validation windows). Without one the defaults are
    tokens drawn at the given temperature in every pass and choice noise 16 annealed to 0, chosen
    on the demo's level-1 student: ranking by probability alone (or annealing the token
    temperature) made its samples far more likely under the teacher than the teacher's own
    (3.6-4.0 vs 5.3 bits/token). A sharper teacher (lower entropy) wants less noise.
    """

    per_sample_generators = True   # takes SampleGenerators: one generator per row

    def __init__(self, student: ParallelStudent, passes: int | None = None, temperature_anneal: bool | None = None,
                 confidence_noise: float | None = None, prefix_cache: bool | None = None, level: int | None = None,
                 temperature_scale: float | None = None, order: str | None = None):
        if not isinstance(student, ParallelStudent):
            raise TypeError(f"student must be a ParallelStudent, got {type(student).__name__}")
        if level is not None and student.config.level != level:
            raise ValueError(f"this student upsamples level {student.config.level}, not level {level} "
                             f"(a student for another level)")
        own = student.sampling
        passes = own.passes if passes is None else passes
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f"passes must be an integer >= 1, got {passes!r}")
        self.prefix_cache = own.prefix_cache if prefix_cache is None else bool(prefix_cache)
        temperature_anneal = own.temperature_anneal if temperature_anneal is None else temperature_anneal
        confidence_noise = own.confidence_noise if confidence_noise is None else confidence_noise
        if confidence_noise < 0:
            raise ValueError(f"confidence_noise must be >= 0, got {confidence_noise}")
        temperature_scale = own.temperature_scale if temperature_scale is None else temperature_scale
        if not temperature_scale > 0:
            raise ValueError(f"temperature_scale must be > 0, got {temperature_scale}")
        order = own.order if order is None else order
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.student, self.passes = student, passes
        self.temperature_anneal, self.confidence_noise = bool(temperature_anneal), float(confidence_noise)
        self.temperature_scale, self.order = float(temperature_scale), order

    @property
    def config(self):
        return self.student.config

    def _check(self, known, n_new, temperature, top_k, top_p) -> torch.Tensor:
        return check_window_call(known, n_new, temperature, top_k, top_p, self.config,
                                 self.student.device)

    @torch.no_grad()
    def __call__(self, known, n_new: int, upper=None, labels=None, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 0.0, chunk_size: int | None = None,
                 generator: torch.Generator | SampleGenerators | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 on_pass: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Fill ``n_new`` codes after ``known``.

        Args:
            known: (N, K) codes kept as context and returned unchanged.
            n_new: positions to fill after them; ``K + n_new <= n_ctx``. Positions past
                ``K + n_new`` stay masked (context-free padding).
            upper: (N, n_ctx // cond_downsample) codes of the level above under this window.
            labels: (N, label_len) label rows of this window, when the student has labels.
            temperature, top_k, top_p: as in ``fastjukebox.sampling.sample_logits`` (temperature
                0: argmax); the temperature is the first pass's when annealing.
            chunk_size: accepted for interface compatibility with the autoregressive
                ``sample_window``; unused (every pass is one full-window evaluation).
            generator: random source (on the student's device) for reproducible runs; one for
                the batch, or ``SampleGenerators`` (one per row: each row draws what it would
                alone, so a sample does not depend on the others of its batch).
            on_progress: called after each pass with the number of codes that became final
                (per sample).
            on_pass: called before each pass with a copy of the window's codes as that pass
                sees them ((N, n_ctx), ``mask_id`` where unknown); on-policy training reads them.
        Returns:
            (N, K + n_new) codes: ``known`` followed by the new codes.
        """
        student, c = self.student, self.config
        z = self._check(known, n_new, temperature, top_k, top_p)
        cond = student.condition(upper, labels)
        N, K = z.shape
        student.check_batch(N, cond)
        if n_new == 0:
            return z.clone()
        tokens = torch.full((N, c.n_ctx), student.mask_id, dtype=torch.long, device=z.device)
        tokens[:, :K] = z
        cache = student.prefix_cache(z, cond) if self.prefix_cache and K else None
        passes = min(self.passes, n_new)
        fixed = self.order != "confidence"
        # absolute positions still masked, (N, remaining); their order follows the last topk, or
        # with a fixed order (spread, random) that order, whose first columns each pass makes final
        if self.order == "random":
            offsets = fill_rows(torch.empty(N, n_new, device=z.device), generator,
                                lambda t, g: t.uniform_(generator=g)).argsort(dim=1)
        else:
            offsets = torch.tensor(spread_order(n_new) if fixed else range(n_new), device=z.device).expand(N, n_new)
        masked = K + offsets
        remaining = n_new
        temperature = float(temperature) * self.temperature_scale
        # every pass's draw noise goes into one buffer (the first pass's is the largest)
        noise = torch.empty(N * n_new * c.l_bins, dtype=torch.float32, device=z.device) if temperature > 0 else None
        for i, still in enumerate(masks_per_pass(n_new, passes)):
            t = pass_temperature(temperature, i, passes) if self.temperature_anneal else temperature
            if on_pass is not None:
                on_pass(tokens.clone())
            if fixed:                   # the next positions of the order become final; heads only there
                final, masked = masked[:, :remaining - still], masked[:, remaining - still:]
                ids, _ = draw_codes(student.logits_unchecked(tokens, cond, cache=cache, positions=final),
                                    t, top_k, top_p, generator, noise)
                tokens.scatter_(1, final, ids)
            else:
                logits = student.logits_unchecked(tokens, cond, cache=cache, positions=masked)  # (N, remaining, V)
                ids, conf = draw_codes(logits, t, top_k, top_p, generator, noise)                  # (N, remaining) each
                if self.confidence_noise:
                    e = fill_rows(torch.empty_like(conf), generator, exponential_noise_)
                    conf = conf - self.confidence_noise * (1.0 - i / passes) * e.log()   # + scaled Gumbel(0, 1)
                if still:
                    stay = torch.topk(conf, still, dim=1, largest=False).indices      # least confident stay masked
                    keep_masked = torch.zeros_like(masked, dtype=torch.bool).scatter_(1, stay, True)
                    tokens.scatter_(1, masked, torch.where(keep_masked, student.mask_id, ids))
                    masked = masked.gather(1, stay)
                else:
                    tokens.scatter_(1, masked, ids)
            if on_progress is not None:
                on_progress(remaining - still)
            remaining = still
        return tokens[:, :K + n_new].clone()
