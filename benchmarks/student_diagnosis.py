"""Why a parallel student falls short of its teacher: one table over unmasking orders and pass
counts, on held-out hopped windows, inference only.

    python -m benchmarks student-diagnosis [--model demo] [--level 0] [--windows 128]
        [--one-per-pass-windows 32] [--out benchmarks/results/level0-diagnosis]

Held-out windows of the level (the demo corpus's held-out split, as ``distill.evaluate``): the
teacher samples each window from nothing (A); its first half is the known prefix of a hopped
window, which the teacher continues once more (the reference) and the student continues under
every setting of the grid:

* ``order``: ``confidence`` (each pass keeps its most confident draws, with the student's own
  choice noise), ``spread`` (a fixed order whose every pass is spread evenly over the window;
  neighbours never fall in one pass) and ``random`` (a random order per window);
* ``passes`` K: 16, 4 and 2, and one token per pass (K = n, on ``--one-per-pass-windows`` of the
  windows: as many student evaluations as AR steps, which shows whether the student could match
  the teacher at all: far above the teacher there, the limit is the student's capacity, not the
  number of passes).

First, how much the student uses the codes it is given (``context_use``): its cross-entropy on
the real codes at masked new positions, with nothing visible and with a growing share of the new
half visible, against the teacher's with all left context. Then per setting, over the new half of
every window: the teacher NLL of the student's codes against
that of the teacher's own continuation (``nll_ratio``; within 5% is the distillation target),
the teacher's predictive entropy along the student's codes (a student that only meets the NLL by
collapsing onto likely codes shows a low one), codebook usage and the code histogram's TV to the
teacher's, and the teacher NLL of the codes decided in each pass (first, middle and last pass;
positions decided early have the least context). Once per run: the student's and the teacher's
next-token entropies and their total variation along the teacher's samples
(``distill.metrics.next_token_tv``).

A second table tries teacher re-scoring (``--rescore K:R:F``): the student's K passes, then R
rounds of one teacher-forced pass over the draft, whose fraction F of new codes least likely
under the teacher are masked again and drawn anew by one student pass (K + 2R model passes in
all). Writes ``OUT.json`` and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from fastjukebox.atomic import atomic_path

DEFAULT_PASSES = (16, 4, 2)
DEFAULT_RESCORINGS = ((2, 1, 0.25), (2, 3, 0.15), (4, 2, 0.2), (4, 4, 0.1))   # (K, rounds, fraction)
ORDERS = ("confidence", "spread", "random")


def decided_pass(calls: list[torch.Tensor], mask_id: int, known: int, n_new: int) -> torch.Tensor:
    """For every new position of a window, the index of the pass that made it final, from the
    student's input tokens at each pass (``calls``, each (N, n_ctx)): a position stays masked
    until its pass, and final after it. Returns (N, n_new) long."""
    masked = torch.stack([c[:, known:known + n_new] == mask_id for c in calls])   # (passes, N, n_new)
    return masked.sum(0) - 1


def _student_run(student, sampler, prefix, n_new, upper, labels, *, temperature, batch_size, generator):
    """The student's continuations of ``prefix`` (S, known) and, per new position, its pass."""
    codes, passes = [], []
    real = student.logits_unchecked
    for i in range(0, upper.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        calls = []

        def recording(tokens, *a, **k):
            calls.append(tokens.clone())
            return real(tokens, *a, **k)

        student.logits_unchecked = recording
        try:
            out = sampler(prefix[sl], n_new, upper[sl], None if labels is None else labels[sl],
                          temperature=temperature, generator=generator)
        finally:
            student.logits_unchecked = real
        codes.append(out.cpu())
        passes.append(decided_pass(calls, student.mask_id, prefix.shape[1], n_new).cpu())
    return torch.cat(codes), torch.cat(passes)


@torch.no_grad()
def rescore(prior, student, z: torch.Tensor, upper, labels, known: int, rounds: int, fraction: float,
            temperature: float, generator) -> torch.Tensor:
    """``rounds`` of teacher re-scoring on drafts ``z`` (N, n_ctx) (module docstring): each round
    masks the ``fraction`` of new codes with the lowest teacher log-probability and draws them
    again from one student pass; known codes never change."""
    from distill.sampler import draw_codes
    cond = student.condition(upper, labels)
    m = int(fraction * (z.shape[1] - known))
    for _ in range(rounds if m else 0):
        logp = torch.log_softmax(prior.logits(z, upper, labels).float(), dim=-1)[:, known:]
        worst = logp.gather(-1, z[:, known:, None])[..., 0].topk(m, dim=1, largest=False).indices + known
        tokens = z.scatter(1, worst, student.mask_id)
        ids, _ = draw_codes(student.logits_unchecked(tokens, cond, positions=worst), temperature, 0, 0.0, generator)
        z = z.scatter(1, worst, ids)
    return z


@torch.no_grad()
def context_use(student, codes: torch.Tensor, upper, labels, known: int, fractions=(0.0, 0.5, 0.95),
                generator=None, batch_size: int = 16) -> dict:
    """How much the student uses the codes it is given: its cross-entropy (bits) at the masked new
    positions of ``codes`` (S, n_ctx) when a random ``fraction`` of the new positions is visible
    (the first ``known`` always are), per fraction; and with nothing visible at all (``"none"``:
    the upper codes and labels alone). A student that predicts from the conditioning alone shows
    the same number everywhere."""
    n_ctx = codes.shape[1]
    out = {}
    for name, frac in [("none", None)] + [(f"{f:g}", f) for f in fractions]:
        total = count = 0.0
        for i in range(0, codes.shape[0], batch_size):
            z = codes[i:i + batch_size]
            cond = student.condition(upper[i:i + batch_size], None if labels is None else labels[i:i + batch_size])
            tokens = z.clone()
            if frac is None:
                tokens[:] = student.mask_id
                hidden = torch.ones(z.shape[0], n_ctx - known, dtype=torch.bool)
            else:
                hidden = torch.rand(z.shape[0], n_ctx - known, generator=generator) >= frac
                hidden[:, 0] |= ~hidden.any(1)                          # at least one scored position
                tokens[:, known:][hidden] = student.mask_id
            pos = torch.arange(known, n_ctx).expand(z.shape[0], -1)
            prefix_len = known if student.sampling.prefix_cache and frac is not None else 0
            logp = torch.log_softmax(student.logits_unchecked(tokens, cond, prefix_len=prefix_len, positions=pos)
                                     .float(), dim=-1).gather(-1, z[:, known:, None])[..., 0]
            total += float(-logp[hidden].sum())
            count += int(hidden.sum())
        out[name] = total / count / math.log(2.0)
    return out


def _per_pass(nll: torch.Tensor, passes: torch.Tensor) -> dict:
    """Mean teacher NLL (bits) of the codes decided in the first, middle and last pass."""
    last = int(passes.max())
    return {name: float(nll[passes == p].mean()) for name, p in (("first", 0), ("middle", last // 2), ("last", last))}


@torch.no_grad()
def diagnose(jb, student, *, windows: int = 128, one_per_pass_windows: int = 32, passes=DEFAULT_PASSES,
             orders=ORDERS, rescorings=DEFAULT_RESCORINGS, batch_size: int = 16, temperature: float = 1.0,
             seed: int = 0, progress: bool = True) -> dict:
    from distill.data import load_pieces, real_windows, sample_teacher
    from distill.metrics import (code_histogram, codebook_usage, histogram_tv, next_token_tv,
                                 teacher_token_scores)
    from distill.sampler import ParallelWindowSampler

    say = (lambda m: print(f"[diagnosis] {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    level = student.config.level
    prior = jb.prior(level).eval()
    student = student.eval()
    c = prior.config
    known, n_new = c.n_ctx // 2, c.n_ctx - c.n_ctx // 2
    if windows < 2 or not 1 <= one_per_pass_windows <= windows:
        raise ValueError(f"need windows >= 2 and 1 <= one_per_pass_windows <= windows, got {windows}, "
                         f"{one_per_pass_windows}")
    dev = prior.device
    bs = min(batch_size, windows)
    say(f"encoding {windows} held-out level-{level} windows")
    w = real_windows(jb.vqvae, prior, load_pieces(None, "heldout", jb.sr), windows,
                     torch.Generator().manual_seed(seed))
    gen = torch.Generator(device=dev).manual_seed(seed)
    decoders: dict = {}
    t0 = time.perf_counter()
    say(f"teacher: {windows} windows from nothing, then their second halves again")
    a = sample_teacher(prior, w.upper, w.labels, temperature=temperature, batch_size=bs, generator=gen,
                       decoders=decoders)
    prefix = a[:, :known]
    ref = sample_teacher(prior, w.upper, w.labels, temperature=temperature, batch_size=bs, generator=gen,
                         decoders=decoders, known=prefix)
    teacher_seconds = (time.perf_counter() - t0) / (2 * windows)
    nll_t, ent_t = teacher_token_scores(prior, ref, w.upper, w.labels, bs, start=known)
    hist_t, use_t = code_histogram(ref[:, known:], c.l_bins), codebook_usage(ref[:, known:])
    tv = next_token_tv(prior, student, ref, w.upper, w.labels, known=known, positions=8,
                       generator=torch.Generator().manual_seed(seed))

    say("student: cross-entropy on the real codes with more and more of them visible")
    ctx = context_use(student, w.real, w.upper, w.labels, known, generator=torch.Generator().manual_seed(seed + 1),
                      batch_size=bs)
    teacher_real, _ = teacher_token_scores(prior, w.real, w.upper, w.labels, bs, start=known)

    settings = [(o, k) for k in passes for o in orders] + [("confidence", n_new)]
    rows = []
    for order, k in settings:
        m = one_per_pass_windows if k == n_new else windows
        say(f"student: {order} order, {k} passes, {m} windows")
        sampler = ParallelWindowSampler(student, passes=k, order=order, temperature_anneal=False)
        t1 = time.perf_counter()
        z, decided = _student_run(student, sampler, prefix[:m], n_new, w.upper[:m], None if w.labels is None else
                                  w.labels[:m], temperature=temperature, batch_size=bs, generator=gen)
        seconds = (time.perf_counter() - t1) / m
        nll_s, ent_s = teacher_token_scores(prior, z, w.upper[:m], None if w.labels is None else w.labels[:m], bs,
                                            start=known)
        teacher_nll = float(nll_t[:m].mean())
        per_window = nll_s.mean(1) / nll_t[:m].mean(1)
        rows.append(dict(order=order, passes=k, windows=m, teacher_nll_student=float(nll_s.mean()),
                         teacher_nll_teacher=teacher_nll, nll_ratio=float(nll_s.mean()) / teacher_nll,
                         nll_ratio_stderr=float(per_window.std() / per_window.numel() ** 0.5) if m > 1 else 0.0,
                         entropy_along_student=float(ent_s.mean()), entropy_along_teacher=float(ent_t[:m].mean()),
                         codebook_usage_student=codebook_usage(z[:, known:]),
                         codebook_usage_teacher=codebook_usage(ref[:m, known:]),
                         histogram_tv=histogram_tv(code_histogram(z[:, known:], c.l_bins),
                                                   code_histogram(ref[:m, known:], c.l_bins)),
                         nll_by_pass=_per_pass(nll_s, decided), seconds_per_window=seconds))
    rescored = []
    for k, rounds, fraction in rescorings:
        say(f"student: {k} passes, then {rounds} teacher re-scoring rounds of {fraction:g}")
        sampler = ParallelWindowSampler(student, passes=k, temperature_anneal=False)
        t1 = time.perf_counter()
        parts = []
        for i in range(0, windows, bs):
            sl = slice(i, i + bs)
            u, y = w.upper[sl].to(dev), None if w.labels is None else w.labels[sl].to(dev)
            z = sampler(prefix[sl].to(dev), n_new, u, y, temperature=temperature, generator=gen)
            parts.append(rescore(prior, student, z, u, y, known, rounds, fraction, temperature, gen).cpu())
        z = torch.cat(parts)
        seconds = (time.perf_counter() - t1) / windows
        nll_s, ent_s = teacher_token_scores(prior, z, w.upper, w.labels, bs, start=known)
        per_window = nll_s.mean(1) / nll_t.mean(1)
        rescored.append(dict(passes=k, rounds=rounds, fraction=fraction, model_passes=k + 2 * rounds,
                             teacher_nll_student=float(nll_s.mean()), nll_ratio=float(nll_s.mean() / nll_t.mean()),
                             nll_ratio_stderr=float(per_window.std() / windows ** 0.5),
                             entropy_along_student=float(ent_s.mean()), codebook_usage_student=codebook_usage(z[:, known:]),
                             histogram_tv=histogram_tv(code_histogram(z[:, known:], c.l_bins), hist_t),
                             seconds_per_window=seconds))
    return dict(level=level, n_ctx=c.n_ctx, known=known, windows=windows, temperature=temperature, seed=seed,
                rescored=rescored, context_use=ctx, teacher_nll_real=float(teacher_real.mean()),
                student_sampling=dict(vars(student.sampling)), input_layout=student.prior.input_layout,
                teacher_seconds_per_window=teacher_seconds,
                teacher_nll=float(nll_t.mean()), teacher_entropy=float(ent_t.mean()),
                codebook_usage_teacher=use_t, next_token_tv=tv["mean_tv"], next_token_tv_stderr=tv["stderr"],
                next_token_entropy_student=tv["entropy_student"], next_token_entropy_teacher=tv["entropy_teacher"],
                rows=rows, machine=platform.processor() or platform.machine(), torch=torch.__version__,
                threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def format_markdown(r: dict, command: str) -> str:
    lines = [f"# Level-{r['level']} student diagnosis", "",
             f"`{command}`, {r['date']}; {r['machine']}, torch {r['torch']}, {r['threads']} thread(s).", "",
             f"Held-out hopped windows: n_ctx {r['n_ctx']}, the first {r['known']} codes the teacher's own, the "
             f"rest sampled and scored; {r['windows']} windows (one token per pass: the number in the table), "
             f"temperature {r['temperature']}. The student's saved settings: {r['student_sampling']}; input layout "
             f"{r.get('input_layout', 'tokens')}.", "",
             f"- Teacher NLL of its own continuations: {r['teacher_nll']:.3f} bits/token; the teacher's "
             f"predictive entropy along them {r['teacher_entropy']:.3f} bits; codes used {r['codebook_usage_teacher']}.",
             f"- Next-token distributions along the teacher's samples: student entropy "
             f"{r['next_token_entropy_student']:.3f} bits against the teacher's {r['next_token_entropy_teacher']:.3f}; "
             f"total variation {r['next_token_tv']:.3f} +- {r['next_token_tv_stderr']:.3f}.",
             "- The student's cross-entropy at masked new positions of the real codes (bits), with nothing "
             "visible / the known half visible and a share of the new half: "
             + ", ".join(f"{k}: {v:.3f}" for k, v in r.get("context_use", {}).items())
             + f"; the teacher's on the same codes (all left context): {r.get('teacher_nll_real', float('nan')):.3f}.",
             "",
             "| order | passes | windows | teacher NLL | NLL ratio | entropy along samples (teacher's own) | codes used "
             "(teacher's) | histogram TV | NLL of codes decided in the first / middle / last pass | s / window |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for x in r["rows"]:
        p = x["nll_by_pass"]
        lines.append(f"| {x['order']} | {x['passes']} | {x['windows']} | {x['teacher_nll_student']:.3f} | "
                     f"{x['nll_ratio']:.3f} +- {x['nll_ratio_stderr']:.3f} | {x['entropy_along_student']:.3f} "
                     f"({x['entropy_along_teacher']:.3f}) | {x['codebook_usage_student']} ({x['codebook_usage_teacher']}) | "
                     f"{x['histogram_tv']:.3f} | {p['first']:.2f} / {p['middle']:.2f} / {p['last']:.2f} | "
                     f"{x['seconds_per_window']:.3f} |")
    if r.get("rescored"):
        lines += ["", "Teacher re-scoring (confidence order, the student's noise; K student passes, then R rounds "
                      "of a teacher-forced pass choosing the fraction F of new codes to draw again in one student "
                      "pass):", "",
                  "| K | R | F | model passes | teacher NLL | NLL ratio | entropy along samples | codes used | "
                  "histogram TV | s / window |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for x in r["rescored"]:
            lines.append(f"| {x['passes']} | {x['rounds']} | {x['fraction']:g} | {x['model_passes']} | "
                         f"{x['teacher_nll_student']:.3f} | {x['nll_ratio']:.3f} +- {x['nll_ratio_stderr']:.3f} | "
                         f"{x['entropy_along_student']:.3f} | {x['codebook_usage_student']} | {x['histogram_tv']:.3f} | "
                         f"{x['seconds_per_window']:.3f} |")
    lines += ["", f"Teacher (exact AR, static cache): {r['teacher_seconds_per_window']:.3f} s per window "
                  "(mean of the from-nothing and the hopped sampling, same run)."]
    return "\n".join(lines) + "\n"


def _rescoring(text: str) -> tuple[int, int, float]:
    """``K:R:F`` -> (passes >= 1, rounds >= 0, fraction in (0, 1])."""
    try:
        k, r, f = text.split(":")
        k, r, f = int(k), int(r), float(f)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K:R:F (e.g. 2:3:0.15), got {text!r}") from None
    if k < 1 or r < 0 or not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"need K >= 1, R >= 0 and 0 < F <= 1, got {text!r}")
    return k, r, f


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks student-diagnosis",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="demo", help="bundle name or directory holding the priors and students")
    p.add_argument("--level", type=int, default=0, choices=(0, 1), help="upsampler level")
    p.add_argument("--student", type=Path, default=None,
                   help="student directory to diagnose (default: the model's own student of the level)")
    p.add_argument("--windows", type=int, default=128, help="held-out hopped windows")
    p.add_argument("--one-per-pass-windows", type=int, default=32,
                   help="of those, windows sampled with one token per pass")
    p.add_argument("--passes", type=int, nargs="+", default=list(DEFAULT_PASSES), help="pass counts tried per order")
    p.add_argument("--rescore", nargs="*", type=_rescoring, default=list(DEFAULT_RESCORINGS), metavar="K:R:F",
                   help="teacher re-scoring settings: K student passes, R rounds, fraction F re-drawn per round")
    p.add_argument("--batch-size", type=int, default=16, help="windows sampled together")
    p.add_argument("--seed", type=int, default=0, help="random seed of windows and samples")
    p.add_argument("--out", type=Path, default=None,
                   help="output path without suffix (default: benchmarks/results/level<L>-diagnosis)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if min(args.passes) < 1:
        p.error(f"--passes must be >= 1, got {args.passes}")
    import fastjukebox as fj
    jb = fj.load(args.model)
    if args.student is None:
        student = jb.student(args.level)
    else:
        from distill.student import ParallelStudent
        student = ParallelStudent.load(args.student)
        if student.config.level != args.level:
            p.error(f"--student {args.student} is a level-{student.config.level} student; --level is {args.level}")
    r = diagnose(jb, student, windows=args.windows, one_per_pass_windows=args.one_per_pass_windows,
                 passes=tuple(args.passes), rescorings=tuple(args.rescore), batch_size=args.batch_size, seed=args.seed,
                 progress=not args.quiet)
    out = args.out or Path(__file__).parent / "results" / f"level{args.level}-diagnosis"
    command = "python -m benchmarks student-diagnosis " + " ".join(argv if argv is not None else sys.argv[1:])
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(r, indent=1) + "\n")
    md = format_markdown(r, command.strip())
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(md)
    print(md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
