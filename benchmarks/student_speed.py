"""Parallel students against exact AR sampling, per window and per minute of audio, in one run.

    python -m benchmarks students [--model demo] [--students DIR] [--passes 1,2,4,8,16]
        [--batches 1,16] [--rounds 3] [--out benchmarks/results/student-speed-cpu]

For each upsampler level of the family and each batch size, one window of each kind is timed:

* ``first``: a level's first window, nothing known, all ``n_ctx`` codes sampled;
* ``hopped``: every later window, the first half known (the upsamplers hop by half a window),
  the other half sampled.

Samplers: exact AR (``fastjukebox.decoding.WindowDecoder``, static cache: the known half is
primed, then one step per token), and the student at each K with the prefix cache (the known
half runs once, each pass only the unknown half; ``distill.prefix_layout``) and, for
comparison, with full-window passes (the layout of students trained without it). All
measurements of one run are interleaved round by round, so a change of machine load hits every
sampler alike; the median of ``--rounds`` rounds after one warm-up is reported. Per minute of
audio: one first window plus ``(tokens per minute - n_ctx) / hop`` hopped windows of the level.
Inputs are random codes: speed does not depend on their values or on the students' weights.

The markdown report ends with the labelled projection of ``benchmarks.student_projection``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from fastjukebox.atomic import atomic_path

from .report_cases import ar_runner, geometry, student_runner
from .student_projection import format_projection, projection

DEFAULT_OUT = Path(__file__).parent / "results" / "student-speed-cpu"


def _ints(text: str, least: int = 1) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < least:
        raise argparse.ArgumentTypeError(f"expected integers >= {least}, got {text!r}")
    return values


def plan(jb, students, passes, batches) -> list[dict]:
    """Every case to time: level, batch, window kind, sampler, K, layout."""
    cases = []
    for level in sorted(students, reverse=True):
        prior, student = jb.prior(level), students[level]
        c = prior.config
        hop = geometry(c, jb.vqvae.hop_lengths[level]).hop_tokens
        for b in batches:
            for kind, known in (("first", 0), ("hopped", c.n_ctx - hop)):
                new = c.n_ctx - known
                base = dict(level=level, batch=b, window=kind, known=known, n_new=new)
                cases.append({**base, "sampler": "ar", "passes": new,
                              "prepare": ar_runner("ours", prior, b, known, new)})
                for K in passes:
                    layouts = (True, False) if known else (False,)
                    for cached in layouts:
                        if not cached and known and K not in (min(passes), max(passes), 4):
                            continue                 # full-window passes only as a reference
                        cases.append({**base, "sampler": "student", "passes": K, "prefix_cache": cached,
                                      "prepare": student_runner(student, K, b, known, new, prefix_cache=cached)})
    return cases


@torch.no_grad()
def run_cases(cases: list[dict], rounds: int, progress: bool = True) -> list[dict]:
    from fastjukebox.progress import progress_bar
    times = [[] for _ in cases]
    bar = progress_bar((rounds + 1) * len(cases), "student speed", "run", enabled=progress)
    for r in range(rounds + 1):                      # round 0: warm-up
        for i, case in enumerate(cases):
            run = case["prepare"]()
            t0 = time.perf_counter()
            run()
            dt = time.perf_counter() - t0
            if r:
                times[i].append(dt)
            bar.update(1)
    bar.close()
    return [{**{k: v for k, v in case.items() if k != "prepare"}, "seconds": t, "median_s": statistics.median(t)}
            for case, t in zip(cases, times)]


def summarise(jb, results: list[dict]) -> list[dict]:
    """Per level and batch: seconds per window of each kind and per minute of audio, and the
    speedups over exact AR, for every sampler row."""
    out = []
    keys = sorted({(r["level"], r["batch"]) for r in results}, key=lambda k: (-k[0], k[1]))
    for level, b in keys:
        rows = [r for r in results if r["level"] == level and r["batch"] == b]
        c = jb.prior(level).config
        g = geometry(c, jb.vqvae.hop_lengths[level])
        hopped_windows = max(0.0, (g.tokens_per_minute - c.n_ctx) / g.hop_tokens)
        find = lambda kind, sampler, K=None, cached=None: next(
            (r["median_s"] for r in rows if r["window"] == kind and r["sampler"] == sampler
             and (K is None or r["passes"] == K) and (cached is None or r.get("prefix_cache") == cached)), None)
        ar_first, ar_hopped = find("first", "ar"), find("hopped", "ar")
        entries = [("exact AR", ar_first, ar_hopped)]
        for K in sorted({r["passes"] for r in rows if r["sampler"] == "student"}):
            first = find("first", "student", K, False)
            entries.append((f"student K={K}, prefix cache", first, find("hopped", "student", K, True)))
            full = find("hopped", "student", K, False)
            if full is not None:
                entries.append((f"student K={K}, full-window passes", first, full))
        for name, first, hopped in entries:
            per_min = first + hopped_windows * hopped
            out.append(dict(level=level, batch=b, sampler=name, first_s=first, hopped_s=hopped, s_per_minute=per_min,
                            speedup_first=ar_first / first, speedup_hopped=ar_hopped / hopped,
                            speedup_per_minute=(ar_first + hopped_windows * ar_hopped) / per_min,
                            hopped_windows_per_minute=hopped_windows))
    return out


def format_markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Parallel students vs exact AR sampling (CPU, one run)", "",
             f"`{report['command']}`; {m['processor']}, torch {m['torch']}, {m['threads']} thread(s); "
             f"rounds interleaved, median of {report['rounds']} after one warm-up. Ratios are of this run.", "",
             "| level | batch | sampler | s / first window | s / hopped window | s / minute of audio | "
             "speedup first | speedup hopped | speedup per minute |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["summary"]:
        lines.append(f"| {r['level']} | {r['batch']} | {r['sampler']} | {r['first_s']:.3g} | {r['hopped_s']:.3g} | "
                     f"{r['s_per_minute']:.3g} | {r['speedup_first']:.2f}x | **{r['speedup_hopped']:.2f}x** | "
                     f"{r['speedup_per_minute']:.2f}x |")
    lines += ["", format_projection(report["projection"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks students", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="model family (default: demo)")
    p.add_argument("--students", default=None,
                   help="directory holding student_level_{1,0}/ to time instead of the family's own")
    p.add_argument("--passes", type=_ints, default=(1, 2, 4, 8, 16), help="student K values (comma-separated)")
    p.add_argument("--batches", type=_ints, default=(1, 16), help="batch sizes (comma-separated)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--levels", type=lambda s: _ints(s, least=0), default=None, help="upsampler levels (default: every level with a student)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output path without extension (.json and .md written)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    import fastjukebox as fj
    from distill.student import ParallelStudent
    torch.set_num_threads(1)
    jb = fj.load(args.model)
    levels = args.levels or tuple(sorted(int(k) for k in jb.students))
    students = {}
    for level in levels:
        if args.students:
            students[level] = ParallelStudent.load(Path(args.students) / f"student_level_{level}")
        else:
            students[level] = jb.student(level)
        students[level].eval().requires_grad_(False)
    results = run_cases(plan(jb, students, args.passes, args.batches), args.rounds, progress=not args.quiet)
    report = dict(command="python -m benchmarks students " + " ".join(argv if argv is not None else sys.argv[1:]),
                  machine=dict(processor=platform.processor() or platform.machine(), torch=torch.__version__,
                               threads=torch.get_num_threads()),
                  rounds=args.rounds, results=results, summary=summarise(jb, results), projection=projection())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(format_markdown(report))
    print(format_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
