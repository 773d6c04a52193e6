"""Left-to-right drafts of a window from a ``ParallelStudent``, with every drafted token's
proposal distribution ``q`` (what exact speculative sampling needs, ``distill.speculative``).

Row ``b`` of the window knows its codes before ``frontier[b]``. A draft of positions ``[lo, hi)``
splits them into ``passes`` consecutive spans; pass ``k`` runs the student once over the window
(known codes and earlier spans' drafts in place, the rest masked) and draws every position of
span ``k`` at or after the row's frontier independently from the student's distribution there.
So a drafted token's distribution given every token left of it is exactly the stored ``q``:
tokens of its own span were drawn independently of it, later spans are to its right. (The
confidence-ordered unmasking of ``ParallelWindowSampler`` keeps a draw depending on its own
value and on tokens to its right, so its tokens have no such ``q``.)

``q`` is filtered as the target is: ``proposal_probs`` applies temperature, top-k and top-p as
the autoregressive sampler does (temperature 0: all mass on the argmax).
"""
from __future__ import annotations

import torch

from kernels.sampling.reference import categorical_draw, sampling_probs

from .student import ParallelStudent

__all__ = ["proposal_probs", "span_bounds", "StudentDraft"]


def proposal_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """The distribution the autoregressive sampler draws from for these logits (``(..., V)`` ->
    fp32 ``(..., V)``); temperature 0 puts all mass on the (filtered) argmax."""
    return sampling_probs(logits, temperature, top_k, top_p)


def span_bounds(lo: int, hi: int, passes: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into ``min(passes, hi - lo)`` consecutive spans of near-equal length."""
    n = min(passes, hi - lo)
    cuts = [lo + (hi - lo) * k // n for k in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


class StudentDraft:
    """Drafts window positions with ``student`` in ``passes`` left-to-right student evaluations.

    ``begin`` takes the window's conditioning once; ``draft`` writes drafted ids into a token
    buffer and their proposal distributions into ``q``.
    """

    def __init__(self, student: ParallelStudent, passes: int = 1):
        if not isinstance(student, ParallelStudent):
            raise TypeError(f"student must be a ParallelStudent, got {type(student).__name__}")
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f"draft passes must be an integer >= 1, got {passes!r}")
        self.student, self.passes = student, passes
        self._cond = None
        self.evaluations = 0     # student passes run since construction

    def begin(self, upper, labels, n: int) -> None:
        """Conditioning of the window (the student's own checks and errors)."""
        self._cond = self.student.condition(upper, labels)
        self.student.check_batch(n, self._cond)

    @torch.no_grad()
    def draft(self, tokens: torch.Tensor, q: torch.Tensor, frontier: torch.Tensor, lo: int, hi: int, *,
              temperature: float, top_k: int, top_p: float, generator: torch.Generator | None) -> int:
        """Draft positions ``[lo, hi)`` of every row at or after its ``frontier``.

        tokens: (N, >= n_ctx) codes, valid before each row's frontier; drafted ids are written
            into it (positions before the frontier are left as they are).
        q: (N, n_ctx, V) fp32; ``q[:, lo:hi]`` receives the proposal distributions.
        frontier: (N,) long, every entry in ``[lo, hi]``.
        Returns the number of tokens drafted (over all rows).
        """
        n_ctx, mask_id = self.student.config.n_ctx, self.student.mask_id
        known = torch.arange(n_ctx, device=tokens.device)[None, :] < frontier[:, None]       # (N, n_ctx)
        student_in = torch.where(known, tokens[:, :n_ctx], torch.full_like(tokens[:, :n_ctx], mask_id))
        for a, e in span_bounds(lo, hi, self.passes):
            logits = self.student.logits_unchecked(student_in, self._cond, a, e)          # (N, e - a, V)
            probs = proposal_probs(logits, temperature, top_k, top_p)
            ids = torch.where(known[:, a:e], student_in[:, a:e], categorical_draw(probs, generator))
            student_in[:, a:e] = ids
            tokens[:, a:e] = ids
            q[:, a:e] = probs
            self.evaluations += 1
        return int((~known[:, lo:hi]).sum())
