"""Exact speculative sampling of an upsampler window: a drafter proposes, the teacher verifies.

The output has exactly the distribution the ``"ar"`` sampler draws from (the teacher ``p``, after
the same temperature / top-k / top-p filter), whatever the draft's quality:

1. the drafter proposes, keeping every drafted token's proposal distribution ``q``: with a
   ``distill.drafter.FeatureDrafter`` (when the level has one) the next ``gamma`` positions
   before every teacher call, one at a time from the teacher's feature of the last decided
   position (``distill.draft.FeatureDraft``); otherwise the parallel student drafts the rest of
   the window left to right (``distill.draft.StudentDraft``);
2. the teacher scores the drafted positions in one chunked cached forward (``WindowDecoder.score``
   / ``score_rows``; a chunk also stops at a block boundary), its inputs being the decided tokens
   and the drafts after them; with the feature drafter the chunk also scores the position after
   the last draft (its input is that draft: the same forward);
3. left to right, a draft ``x`` is accepted with probability ``min(1, p(x) / q(x))``; at the
   first rejection the position is drawn from ``normalize(max(0, p - q))`` instead and the
   rest of the chunk is dropped; with the feature drafter, when every draft is kept the position
   after them is drawn from the teacher's ``p`` there (so a call decides 1 to ``gamma + 1``
   tokens; with the student's draft 1 to ``gamma``);
4. the teacher's static cache is rolled back to the decided length (``WindowDecoder.rewind``:
   a position reset) and the next chunk starts there.

Student drafts after a rejection stay valid proposals (their ``q`` is known given every token left of
them, and no decision has looked at them yet) but were drawn without the correction, so they
are accepted less often. **Re-draft policy**: the student drafts the rest of the window again,
from the decided prefix, when the acceptance of the last ``lookback`` teacher calls falls below
``redraft_below`` (and at least ``lookback`` calls ran since the last draft); ``redraft_below=0``
drafts once per window. ``benchmarks.speculative`` measures the choices.

Rows of a batch accept different lengths. With a feature drafter each row goes on from its own
decided length (``WindowDecoder.score_rows``: per-row positions in one batched teacher call), so a
row's sample is what it would be alone. With the student's draft (or ``rows_apart`` off) the rows
share the cache position: it moves to the shortest decided prefix, and a row that decided further
keeps those tokens fixed (``forced``) until the position catches up: no draft is judged twice.

Where verification is bound by arithmetic, speculation loses to plain steps: the teacher computes
every drafted position of every row, and the rejected ones are thrown away. From
``disable_at_batch`` rows on, the sampler decodes the window token by token with the teacher
(``fastjukebox.sampling.decode_window``, what ``"ar"`` runs: the same distribution) and drafts
nothing, as vLLM's ``speculative_disable_by_batch_size`` does. ``DISABLE_AT_BATCH`` holds the
measured crossover per device type (``docs/speculative.md``); the ``"speculative"`` sampler uses it
unless told otherwise, and compares it with the run's batch size (``run_batch``), so the batches of
one run, and the processes of a launch, all speculate or all step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from fastjukebox.decoding import WindowDecoder
from fastjukebox.prior import Prior
from fastjukebox.sample_seeds import SampleGenerators, fill_rows
from fastjukebox.sampling import check_window_call, decode_window
from fastjukebox.settings import DEFAULT_CHUNK_SIZE
from kernels.sampling.reference import categorical_draw, exponential_noise_

from .draft import FeatureDraft, StudentDraft, proposal_probs
from .drafter import FeatureDrafter, check_drafter_for
from .student import ParallelStudent

__all__ = ["DISABLE_AT_BATCH", "GAMMA", "SpeculativeWindowSampler", "WindowReport", "accept", "residual"]

GAMMA = 8   # drafts the teacher judges per call unless told otherwise (the "speculative" sampler's default)

# Device type -> the batch size from which the "speculative" sampler decodes token by token:
# ``benchmarks.speculative.crossover_batch`` of ``python -m benchmarks speculative --crossover``
# (benchmarks/results/speculative-crossover-cpu.md: 2-core Intel Xeon, one thread, gamma 8, per
# hopped window, level 0 / level 1: batch 4 0.98x / 1.10x, batch 8 0.88x / 0.95x, batch 16 0.79x /
# 0.85x). Device types not listed always speculate (not measured).
DISABLE_AT_BATCH = {"cpu": 8}


def accept(p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The speculative rule: keep a draft ``x`` drawn from ``q`` iff ``u * q(x) < p(x)``,
    ``u ~ U[0, 1)``, i.e. with probability ``min(1, p(x) / q(x))``."""
    return u * q_x < p_x


def _uniform_(out: torch.Tensor, generator) -> torch.Tensor:
    return out.uniform_(generator=generator)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where a rejected position is drawn from: ``max(0, p - q)`` (unnormalised; ``categorical_draw``
    does not need the sum). Rows where it is all zero (``p == q`` up to rounding) fall back to ``p``."""
    r = (p - q).clamp_min_(0.0)
    return torch.where(r.sum(dim=-1, keepdim=True) > 0, r, p)


@dataclass
class WindowReport:
    """One window (one call) of the speculative sampler, summed over the rows.

    rows: samples in the window; new_tokens: tokens sampled (all rows); drafted: tokens the drafter
    drafted (re-drafts included);
    verified: drafts the teacher judged; accepted: drafts it kept; teacher_calls: chunked
    teacher forwards (and the first position's step where a window starts empty with a feature
    drafter); student_passes: student evaluations; drafter_steps: feature-drafter positions run
    (each one step for the batch)."""

    rows: int = 0
    new_tokens: int = 0
    drafted: int = 0
    verified: int = 0
    accepted: int = 0
    teacher_calls: int = 0
    student_passes: int = 0
    drafter_steps: int = 0

    @property
    def acceptance(self) -> float:
        """Accepted share of the judged drafts."""
        return self.accepted / self.verified if self.verified else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance": self.acceptance}


class SpeculativeWindowSampler:
    """Window sampler ``"speculative"``: the teacher's exact distribution, drafted by its student.

    Args:
        prior: the teacher (an upsampler ``Prior``).
        student: its ``ParallelStudent`` (same codebook and window), or None with a ``drafter``.
        drafter: a ``FeatureDrafter`` made for this prior; drafts in place of the student.
        gamma: drafts judged per teacher call, >= 1 (with a feature drafter the call scores one
            position more: the one after the drafts).
        draft_passes: student evaluations per draft of the rest of the window.
        redraft_below, lookback: the re-draft policy (module docstring).
        disable_at_batch: from this many rows on, decode token by token without drafts (module
            docstring); None: always speculate.
        run_batch: the rows of the run's batches (``fastjukebox.samplers.build_window_samplers``):
            ``disable_at_batch`` is compared with it instead of each window's rows, so every batch of
            a run (and every process of a launch) decodes alike; None: each window's rows.

    Same call signature as ``fastjukebox.sampling.ARWindowSampler``; ``reports`` lists a
    ``WindowReport`` per call, ``progress_note()`` the acceptance so far (for progress bars).
    """

    per_sample_generators = True   # takes SampleGenerators: one generator per row

    # a feature drafter's batch scores each row from its own position (``_rows_apart``); off, the
    # rows share one position (the slowest row's) and rows ahead wait with their tokens fixed
    rows_apart = True

    # batch 1 judges a chunk with Python numbers (the same decisions as the batched rule, in a
    # third of its tensor operations); tests switch it off to compare the two
    one_row_fast_path = True

    def __init__(self, prior: Prior, student: ParallelStudent | None = None, gamma: int = GAMMA,
                 draft_passes: int = 1, redraft_below: float = 0.0, lookback: int = 4,
                 drafter: FeatureDrafter | None = None, disable_at_batch: int | None = None,
                 run_batch: int | None = None):
        if not isinstance(prior, Prior):
            raise TypeError(f"prior must be a Prior, got {type(prior).__name__}")
        tc = prior.config
        if tc.is_top or tc.lyrics is not None:
            raise ValueError(f"speculative sampling covers the upsamplers; level {tc.level} is "
                             f"{'the top level' if tc.is_top else 'lyric-conditioned'}")
        if drafter is not None:
            if not isinstance(drafter, FeatureDrafter):
                raise TypeError(f"drafter must be a FeatureDrafter, got {type(drafter).__name__}")
            check_drafter_for(drafter, prior)
        elif not isinstance(student, ParallelStudent):
            raise TypeError(f"student must be a ParallelStudent (or give a drafter), got {type(student).__name__}")
        else:
            sc = student.config
            if sc.l_bins != tc.l_bins:
                raise ValueError(f"the student's codebook has {sc.l_bins} codes, the teacher's {tc.l_bins}")
            if sc.n_ctx != tc.n_ctx:
                raise ValueError(f"the student's window is n_ctx={sc.n_ctx}, the teacher's n_ctx={tc.n_ctx}")
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"gamma (positions the teacher verifies per call) must be an integer >= 1, got {gamma!r}")
        if not 0.0 <= redraft_below <= 1.0:
            raise ValueError(f"redraft_below must be in [0, 1], got {redraft_below}")
        if isinstance(lookback, bool) or not isinstance(lookback, int) or lookback < 1:
            raise ValueError(f"lookback must be an integer >= 1, got {lookback!r}")
        for name, value in (("disable_at_batch", disable_at_batch), ("run_batch", run_batch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        self.disable_at_batch, self.run_batch = disable_at_batch, run_batch
        self.prior, self.student, self.config = prior, student, tc
        self.gamma, self.redraft_below, self.lookback = gamma, float(redraft_below), lookback
        self.drafter = FeatureDraft(drafter) if drafter is not None else StudentDraft(student, draft_passes)
        self.decoder: WindowDecoder | None = None
        self.reports: list[WindowReport] = []

    def _window_noise(self, n: int, lo: int, hi: int, generator):
        """Each position's random numbers for a feature drafter's window, per row (from its own
        generator with SampleGenerators), indexed by music position: the drafts' Exp(1) noise, the
        acceptance uniforms and the Exp(1) noise of the position's teacher draw (residual or next
        position). A position drafted again after an earlier rejection in its chunk reuses its draft
        noise (the draft it replaces decided nothing); the others are used once, when it is decided."""
        c, dev = self.config, self.prior.device
        draft_noise = torch.empty(n, c.n_ctx, c.l_bins, device=dev)
        u = torch.zeros(n, c.n_ctx, device=dev)
        noise = torch.empty(n, c.n_ctx, c.l_bins, device=dev)
        fill_rows(draft_noise[:, lo:hi], generator, exponential_noise_)
        fill_rows(u[:, lo:hi], generator, _uniform_)
        fill_rows(noise[:, lo:hi], generator, exponential_noise_)
        return draft_noise, u, noise

    @torch.no_grad()
    def _one_row(self, dec: WindowDecoder, report: WindowReport, hi: int, feature: torch.Tensor, knobs: dict,
                 generator, on_progress) -> torch.Tensor:
        """The feature drafter's loop for one row, its decisions as Python numbers (the same as
        ``_rows_apart`` makes for a batch of one, in fewer tensor operations)."""
        c, C, gamma = self.config, self.config.block_len, self.gamma
        tokens, pos = dec.token_buffer, dec.position
        draft_noise, u, noise = self._window_noise(1, pos, hi, generator)
        q = torch.empty(gamma, c.l_bins, device=dec.device)
        while pos < hi:
            drafts = min(gamma, C - pos % C - 1, hi - pos - 1)    # the position after the drafts is scored too
            n = self.drafter.draft_one(tokens, pos, drafts, feature, draft_noise, q, **knobs)
            p = proposal_probs(dec.score(n + 1), **knobs)[0]                          # (n + 1, V)
            report.teacher_calls += 1
            kept = n
            if n:
                x = tokens[0, pos:pos + n, None]
                run = accept(p[:n].gather(1, x)[:, 0], q[:n].gather(1, x)[:, 0], u[0, pos:pos + n]).tolist()
                kept = run.index(False) if False in run else n
            at = pos + kept              # decided: the kept drafts, then this position from the teacher
            tokens[0, at] = categorical_draw(residual(p[kept], q[kept]) if kept < n else p[n], noise=noise[0, at])
            report.drafted, report.drafter_steps = report.drafted + n, report.drafter_steps + n
            report.accepted, report.verified = report.accepted + kept, report.verified + min(kept + 1, n)
            feature = dec.hidden(at)
            dec.rewind(at + 1)
            if on_progress is not None:
                on_progress(at + 1 - pos)
            pos = at + 1
        return dec.codes()

    @torch.no_grad()
    def _rows_apart(self, dec: WindowDecoder, report: WindowReport, hi: int, feature: torch.Tensor, knobs: dict,
                    generator, on_progress) -> torch.Tensor:
        """The feature drafter's loop for a batch whose rows move on by themselves: every teacher call
        scores each row from its own frontier (``WindowDecoder.score_rows``), so no row waits for
        another; each row drafts, is judged and advances as it would alone."""
        c, N, dev = self.config, dec.n, dec.device
        tokens, C, gamma = dec.token_buffer, c.block_len, self.gamma
        lo = dec.position
        draft_noise, u, noise = self._window_noise(N, lo, hi, generator)
        rows, steps = torch.arange(N, device=dev), torch.arange(gamma, device=dev)[None, :]
        frontier = torch.full((N,), lo, dtype=torch.long, device=dev)
        accepted = verified = drafted = 0
        done_before = lo
        while done_before < hi:
            room = torch.minimum(C - frontier % C, hi - frontier)               # 0 once a row is done
            active = room > 0
            n = (room - 1).clamp_(0, gamma)                  # drafts; the position after them is scored too
            before = self.drafter.evaluations
            x, q = self.drafter.draft_rows(tokens, frontier, n, feature, draft_noise, **knobs)
            report.drafter_steps += self.drafter.evaluations - before
            width = x.shape[1]
            starts = frontier.clamp(max=c.n_ctx - 1)         # a finished row re-runs its last position
            logits, _ = dec.score_rows(width + 1, starts)
            report.teacher_calls += 1
            p = proposal_probs(logits, **knobs)                                     # (N, width + 1, V)
            kept = torch.zeros_like(n)
            if width:
                at = (frontier[:, None] + steps[:, :width]).clamp_(max=c.n_ctx - 1)
                ok = accept(p[:, :width].gather(-1, x[..., None])[..., 0], q.gather(-1, x[..., None])[..., 0],
                            u.gather(1, at)) & (steps[:, :width] < n[:, None])
                kept = ok.long().cumprod(dim=1).sum(dim=1)                          # (N,) accepted run
            spot = (frontier + kept).clamp(max=c.n_ctx - 1)
            dist = p[rows, kept]
            if width:
                dist = torch.where((kept < n)[:, None], residual(dist, q[rows, kept.clamp(max=width - 1)]), dist)
            tokens[rows, spot] = torch.where(active, categorical_draw(dist, noise=noise[rows, spot]), tokens[rows, spot])
            decided = (kept + 1) * active
            # the teacher's feature at each row's new last decided position (this call ran it)
            feature = torch.where(active[:, None], dec.hidden_rows(torch.where(active, spot, starts)), feature)
            frontier = frontier + decided
            accepted, drafted = accepted + kept.sum(), drafted + n.sum()
            verified = verified + torch.minimum(kept + 1, n).sum()
            done = int(frontier.min())
            if on_progress is not None and done > done_before:
                on_progress(done - done_before)
            done_before = done
        dec.resume(hi)
        report.accepted, report.verified, report.drafted = int(accepted), int(verified), report.drafted + int(drafted)
        return dec.codes()

    def progress_note(self) -> str:
        """Acceptance over the windows sampled so far, for a progress bar's postfix."""
        verified = sum(r.verified for r in self.reports)
        accepted = sum(r.accepted for r in self.reports)
        calls = sum(r.teacher_calls for r in self.reports)
        positions = sum(r.new_tokens // r.rows for r in self.reports if r.rows)
        if not verified:
            return ""
        return f"accept {accepted / verified:.0%}, {positions / max(calls, 1):.2f} positions/call"

    def _decoder(self, n: int) -> WindowDecoder:
        if self.decoder is None or self.decoder.batch < n:
            self.decoder = WindowDecoder(self.prior, n)
        return self.decoder

    def _check(self, known, n_new, temperature, top_k, top_p) -> torch.Tensor:
        return check_window_call(known, n_new, temperature, top_k, top_p, self.config,
                                 self.prior.device)

    @torch.no_grad()
    def __call__(self, known, n_new: int, upper=None, labels=None, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 0.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 generator: torch.Generator | SampleGenerators | None = None,
                 on_progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Prime ``known`` (N, K) codes, sample ``n_new`` more: (N, K + n_new) codes. Temperature 0
        is greedy (the teacher's argmax at every position). ``generator``: one for the batch, or
        ``SampleGenerators`` (one per row: each row's random numbers come from its own). ``on_progress(k)``:
        ``k`` more positions decided in every row."""
        z = self._check(known, n_new, temperature, top_k, top_p)
        N, K = z.shape
        hi = K + n_new
        dec = self._decoder(N)
        rows = N if self.run_batch is None else self.run_batch
        if self.disable_at_batch is not None and rows >= self.disable_at_batch:     # token by token, no drafts
            self.reports.append(WindowReport(rows=N, new_tokens=N * n_new, teacher_calls=n_new))
            return decode_window(dec, z, n_new, upper, labels, temperature=temperature, top_k=top_k, top_p=top_p,
                                 chunk_size=chunk_size, generator=generator, on_progress=on_progress)
        dec.begin(upper, labels, n=N)
        dec.prime(z, chunk_size)
        report = WindowReport(rows=N, new_tokens=N * n_new)
        self.reports.append(report)
        if n_new == 0:
            return dec.codes()
        knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        dev, c = z.device, self.config
        features = isinstance(self.drafter, FeatureDraft)
        if features:
            self.drafter.begin(dec.conditioning.x_cond, N)
            if K == 0:     # no feature before the first position: the teacher draws it (one step)
                probs = proposal_probs(dec.step(), **knobs)
                dec.push(categorical_draw(probs, noise=fill_rows(torch.empty_like(probs), generator, exponential_noise_)))
                report.teacher_calls += 1
                if on_progress is not None:
                    on_progress(1)
                if n_new == 1:
                    return dec.codes()
            feature = dec.hidden(dec.position - 1)
            if N == 1 and self.one_row_fast_path:
                return self._one_row(dec, report, hi, feature, knobs, generator, on_progress)
            if self.rows_apart:
                return self._rows_apart(dec, report, hi, feature, knobs, generator, on_progress)
        else:
            self.drafter.begin(upper, labels, N)
        tokens = dec.token_buffer                                   # decided codes, then drafts
        q = torch.zeros(N, c.n_ctx, c.l_bins, device=dev)           # proposal distributions
        # Per drafted position, drawn with its draft: q(x), the acceptance uniform and the Exp(1)
        # noise of its residual draw (each is used at most once: a position is decided once).
        q_x, u = torch.zeros(N, c.n_ctx, device=dev), torch.zeros(N, c.n_ctx, device=dev)
        noise = torch.empty(N, c.n_ctx, c.l_bins, device=dev)
        if features:
            # A feature drafter's draws, drawn once per window: a position drafted again after a
            # rejection earlier in its chunk reuses its noise (the draft it replaces decided nothing).
            draft_noise = fill_rows(torch.empty(N, c.n_ctx, c.l_bins, device=dev)[:, dec.position:hi], generator,
                                    exponential_noise_)
            fill_rows(u[:, dec.position:hi], generator, _uniform_)
            fill_rows(noise[:, dec.position:hi], generator, exponential_noise_)
        frontier = torch.full((N,), dec.position, dtype=torch.long, device=dev)   # row b decided before frontier[b]
        rows, steps = torch.arange(N, device=dev), torch.arange(self.gamma, device=dev)[None, :]
        accepted, verified = 0, 0                    # ints, or 0-dim tensors once rows add to them
        C, pos, even = c.block_len, dec.position, True   # even: every row's frontier is at pos
        dec_start = pos
        recent: list[tuple[int, int]] = []           # (accepted, verified) per call since the draft
        redraft = not features
        while pos < hi:
            T = min(self.gamma, C - pos % C, hi - pos)
            if features:         # the next T positions, from the teacher's feature at pos - 1
                steps_before = self.drafter.evaluations
                report.drafted += self.drafter.draft(tokens, q, None if even else frontier, pos, pos + T, feature,
                                                     draft_noise[:, pos - dec_start:pos - dec_start + T], **knobs)
                report.drafter_steps += self.drafter.evaluations - steps_before
                q_x[:, pos:pos + T] = q[:, pos:pos + T].gather(-1, tokens[:, pos:pos + T, None])[..., 0]
            elif redraft:
                if N == 1 and self.one_row_fast_path:
                    frontier.fill_(pos)          # the scalar path keeps the frontier as ``pos`` only
                passes_before = self.drafter.evaluations
                report.drafted += self.drafter.draft(tokens, q, frontier, pos, hi, generator=generator, **knobs)
                report.student_passes += self.drafter.evaluations - passes_before
                q_x[:, pos:hi] = q[:, pos:hi].gather(-1, tokens[:, pos:hi, None])[..., 0]
                fill_rows(u[:, pos:hi], generator, _uniform_)
                fill_rows(noise[:, pos:hi], generator, exponential_noise_)
                recent.clear()
                redraft = False
            p = proposal_probs(dec.score(T), **knobs)                # (N, T, V)
            report.teacher_calls += 1
            x = tokens[:, pos:pos + T]
            ok = accept(p.gather(-1, x[..., None])[..., 0], q_x[:, pos:pos + T], u[:, pos:pos + T])
            if N == 1 and self.one_row_fast_path:   # the decisions as Python numbers: fewer tensor ops
                run = ok[0].tolist()
                kept = run.index(False) if False in run else T
                if kept < T:              # the first rejection: draw its position from the residual
                    at = pos + kept
                    tokens[0, at] = categorical_draw(residual(p[0, kept], q[0, at]), noise=noise[0, at])
                n_acc, n_ver = kept, kept + (kept < T)
                accepted += n_acc
                verified += n_ver
                new_pos = pos + n_ver
            else:
                ahead = 0
                if not even:              # rows that decided further keep those tokens (forced)
                    ahead = (frontier - pos).clamp_(0, T)
                    ok |= steps[:, :T] < ahead[:, None]
                kept = ok.long().cumprod(dim=1).sum(dim=1)           # (N,) decided run from pos
                rejected = kept < T
                at = pos + kept.clamp(max=T - 1)                      # first rejected position
                fix = categorical_draw(residual(p[rows, at - pos], q[rows, at]), noise=noise[rows, at])
                tokens[rows, at] = torch.where(rejected, fix, tokens[rows, at])
                decided = kept + rejected
                n_acc, n_ver = (kept - ahead).sum(), (decided - ahead).sum()
                accepted += n_acc
                verified += n_ver
                frontier = pos + decided if even else torch.maximum(frontier, pos + decided)
                lo, far = torch.aminmax(frontier)
                new_pos, even = int(lo), bool(far == lo)
            if features:
                feature = dec.hidden(new_pos - 1)
            dec.rewind(new_pos)
            if on_progress is not None:
                on_progress(new_pos - pos)
            pos = new_pos
            if self.redraft_below > 0 and pos < hi:
                recent.append((int(n_acc), int(n_ver)))
                if len(recent) >= self.lookback:
                    ver = sum(v for _, v in recent[-self.lookback:])
                    redraft = ver > 0 and sum(a for a, _ in recent[-self.lookback:]) / ver < self.redraft_below
        report.accepted, report.verified = int(accepted), int(verified)
        return dec.codes()
