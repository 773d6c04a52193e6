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

from fastjukebox.sample_seeds import fill_rows
from kernels.sampling.reference import categorical_draw, exponential_noise_, sampling_probs

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
            draws = categorical_draw(probs, noise=fill_rows(torch.empty_like(probs), generator, exponential_noise_))
            ids = torch.where(known[:, a:e], student_in[:, a:e], draws)
            student_in[:, a:e] = ids
            tokens[:, a:e] = ids
            q[:, a:e] = probs
            self.evaluations += 1
        return int((~known[:, lo:hi]).sum())


class FeatureDraft:
    """Drafts the positions of one teacher call with a ``FeatureDrafter``, one position at a time
    from the teacher's feature of the last decided position (``distill.drafter``).

    ``begin`` takes the window's conditioning (the teacher's ``x_cond``); ``draft`` writes drafted
    ids into a token buffer and their proposal distributions into ``q``.
    """

    def __init__(self, drafter):
        from .drafter import FeatureDrafter
        if not isinstance(drafter, FeatureDrafter):
            raise TypeError(f"drafter must be a FeatureDrafter, got {type(drafter).__name__}")
        self.drafter = drafter
        self.evaluations = 0     # drafted positions run (each one drafter step for the batch)

    # ``draft_one`` and ``draft_rows`` draft with ``FeatureDrafter.chain`` where it covers the settings
    # (the same draws from the same noise, up to rounding); tests switch it off to compare
    chained = True

    def begin(self, x_cond: torch.Tensor | None, n: int) -> None:
        self.drafter.begin(x_cond, n)

    @torch.no_grad()
    def draft(self, tokens: torch.Tensor, q: torch.Tensor, frontier: torch.Tensor | None, lo: int, hi: int,
              feature: torch.Tensor, noise: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> int:
        """Draft positions ``[lo, hi)`` (``lo >= 1``) of every row at or after its ``frontier`` (None:
        every row from ``lo``), from ``feature`` (N, W): the teacher's final activation at ``lo - 1``.

        tokens: (N, >= hi) codes, valid before each row's frontier; drafted ids are written into it.
        q: (N, >= hi, V) fp32; ``q[:, lo:hi]`` receives the proposal distributions.
        noise: (N, hi - lo, V) the Exp(1) noise of the draws (``categorical_draw``).
        Returns the number of tokens drafted (over all rows).
        """
        d = self.drafter
        for t in range(lo, hi):
            feature = d.step(feature, tokens[:, t - 1], t)
            probs = d.step_probs(feature, temperature, top_k, top_p)
            ids = categorical_draw(probs, noise=noise[:, t - lo])
            tokens[:, t] = ids if frontier is None else torch.where(frontier > t, tokens[:, t], ids)
            q[:, t] = probs
            self.evaluations += 1
        if frontier is None:
            return tokens.shape[0] * (hi - lo)
        return int((hi - frontier.clamp(lo, hi)).sum())

    @torch.no_grad()
    def draft_one(self, tokens: torch.Tensor, lo: int, count: int, feature: torch.Tensor, noise: torch.Tensor,
                  q: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> int:
        """Draft up to ``count`` positions from ``lo`` (``>= 1``) of a single row from ``feature`` (1, W),
        the teacher's final activation at ``lo - 1``. Ids go into
        ``tokens`` (1, seq_len), proposal distributions into ``q[j]`` (rows of a (>= count, V)
        buffer); ``noise`` (1, seq_len, V) holds each position's Exp(1) draw noise.
        Returns the number drafted."""
        d = self.drafter
        if not count:
            return 0
        if self.chained and d.chains(temperature, top_k, top_p):
            logits = d.chain(feature, tokens[:, lo - 1], lo, count, noise[0, lo:lo + count, None].log(), temperature,
                             tokens[0, lo:lo + count, None])
            torch.softmax(logits[:, 0], -1, dtype=torch.float32, out=q[:count])
            self.evaluations += count
            return count
        for j in range(count):      # no host sync: the ids stay on the device
            t = lo + j
            feature = d.step(feature, tokens[:, t - 1], t)
            probs = d.step_probs(feature, temperature, top_k, top_p, out=q[j:j + 1])
            tokens[:, t] = categorical_draw(probs, noise=noise[:, t])
            self.evaluations += 1
        return count

    @torch.no_grad()
    def draft_rows(self, tokens: torch.Tensor, frontier: torch.Tensor, counts: torch.Tensor, feature: torch.Tensor,
                   noise: torch.Tensor, *, temperature: float, top_k: int,
                   top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft every row from its own ``frontier`` (N,) (``>= 1``): up to ``counts[n]`` positions of
        row ``n``, from ``feature`` (N, W), the teacher's final activation at ``frontier - 1``.
        Drafted ids go into ``tokens`` (N, seq_len) at ``frontier + j`` for ``j < counts[n]``;
        ``noise`` (N, seq_len, V) holds each position's Exp(1) draw noise.

        Returns ids (N, width) and their proposal distributions (N, width, V), ``width`` the largest
        count (the batch's drafter steps; columns past a row's count are meaningless)."""
        d = self.drafter
        N, last = tokens.shape[0], tokens.shape[1] - 1
        rows = torch.arange(N, device=tokens.device)
        width = int(counts.max())
        if width and self.chained and d.chains(temperature, top_k, top_p):
            at = (frontier[:, None] + torch.arange(width, device=tokens.device)).clamp_(max=last)     # (N, width)
            ids = torch.empty(width, N, dtype=torch.long, device=tokens.device)
            logits = d.chain(feature, tokens[rows, frontier - 1], frontier, width,
                             noise[rows[:, None], at].log_().transpose(0, 1), temperature, ids)
            ids = ids.t()
            drafted = torch.arange(width, device=tokens.device) < counts[:, None]
            tokens[rows[:, None], at] = torch.where(drafted, ids, tokens[rows[:, None], at])
            self.evaluations += width
            return ids, torch.softmax(logits.transpose(0, 1), -1, dtype=torch.float32)
        ids_out, q_out = [], []
        for j in range(width):
            t = (frontier + j).clamp_(max=last)
            feature = d.step(feature, tokens[rows, t - 1], t)
            probs = d.step_probs(feature, temperature, top_k, top_p)
            ids = categorical_draw(probs, noise=noise[rows, t])
            tokens[rows, t] = torch.where(counts > j, ids, tokens[rows, t])
            ids_out.append(ids)
            q_out.append(probs)
            self.evaluations += 1
        if not ids_out:
            V = self.drafter.config.l_bins
            return (torch.empty(N, 0, dtype=torch.long, device=tokens.device),
                    torch.empty(N, 0, V, device=tokens.device))
        return torch.stack(ids_out, 1), torch.stack(q_out, 1)
