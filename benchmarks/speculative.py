"""Speculative sampling (``distill.speculative``) against exact AR sampling on the demo upsamplers.

    python -m benchmarks speculative                 # levels 0 and 1, batch 1 and 16, gamma 4 / 8 / 16
    python -m benchmarks speculative --quick         # level 0, batch 1, gamma 8, one round (a smoke run)
    python -m benchmarks speculative --crossover     # feature drafter vs ar, batch 1 to 16: DISABLE_AT_BATCH

Per level and batch: the upper-level codes are the demo VQ-VAE's encoding of a rendered chord
progression (``fastjukebox.demo.synth``); the *first* window has no known codes and 1024 new
ones; the *hopped* window (every later window of a level: hop 0.5) knows the last 512 codes of
the first window, sampled by ``"ar"``, and samples 512. Both samplers run at the upsamplers'
``temperature=0.99``; rounds alternate the methods so that a change in the machine's load hits
all of them; tokens/s is the median over ``--repeats`` rounds of new tokens (all rows) / wall
seconds of the whole window call (priming and the student's drafts included). Acceptance,
teacher calls and student passes come from the sampler's ``WindowReport``.

Writes ``benchmarks/results/speculative-cpu.{json,md}``. The markdown ends with the labelled
projection to an H100 at the released upsampler size (``project_h100``).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastjukebox.progress import progress_bar  # noqa: E402
from fastjukebox.settings import DEFAULT_TEMPERATURE  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HOP = 512           # the demo upsamplers hop half their 1024-token window

# H100 projection constants (SXM, HBM3): see ``project_h100``.
H100_HBM_BYTES_PER_S = 3.35e12
H100_BF16_FLOP_PER_S = 989e12       # dense
BANDWIDTH_USE = 0.8                 # share of HBM bandwidth a latency-bound step reaches
FLOP_USE = 0.5                      # share of peak a full-window student pass reaches
RELEASED_PARAMS = 981_298_176       # upsampler_level_0 / _1 (README presets table)
RELEASED_N_CTX = 8192
RELEASED_HOP_NEW = 4096             # new tokens of a hopped released-upsampler window
RELEASED_WIDTH, RELEASED_BINS = 1920, 2048
DRAFTER_HIDDEN, DRAFTER_DEPTH = 512, 1   # the FeatureDrafter defaults
DRAFTER_KERNELS = 16                # kernels one drafted position launches (projection, blocks, head, draw)
KERNEL_LATENCY_S = 4e-6             # launch + completion of one small kernel, no CUDA graph

# Draft policies (``SpeculativeWindowSampler`` options): the default at every gamma, the others at
# gamma 8 only.
POLICIES = {"draft once": {}, "2-pass draft": {"draft_passes": 2},
            "re-draft below 50%": {"redraft_below": 0.5, "lookback": 4}}
DEFAULT_POLICY = "draft once"
DRAFTER = "feature drafter"         # the level's drafter_level_{L}/ (every gamma), where the family has one


def drafter_weights_read(width: int = RELEASED_WIDTH, bins: int = RELEASED_BINS, hidden: int = DRAFTER_HIDDEN,
                         depth: int = DRAFTER_DEPTH) -> int:
    """Weights one drafted position reads: the fused projection (feature half), the MLP blocks and
    the output head (one embedding row and one conditioning row besides: negligible)."""
    return width * width + depth * 2 * width * hidden + width * bins


def project_h100(tokens_per_call: float, student_passes: float, drafter_steps: float = 0.0) -> dict:
    """Projected speed-up of ``"speculative"`` over ``"ar"`` for one hopped window of the released
    upsampler on one H100 at batch 1, bf16 (a projection: nothing ran on an H100).

    t_step = 2 * P / (BANDWIDTH_USE * HBM)  (a step, or a teacher chunk of <= 16 positions, reads
        every weight once and does little arithmetic)
    t_pass = 2 * P * n_ctx / (FLOP_USE * bf16 peak)  (a student pass: every weight on every position)
    t_draft = max(2 * D / (BANDWIDTH_USE * HBM), DRAFTER_KERNELS * KERNEL_LATENCY_S)  (a feature-
        drafter position: D weights read, or the latency of its kernels, whichever is longer)
    ar = new * t_step;  speculative = new / tokens_per_call * t_step + student_passes * t_pass
        + drafter_steps * new / demo_new * t_draft
    with ``tokens_per_call``, ``student_passes`` (per window) and ``drafter_steps`` (per new token)
    as measured on the demo."""
    t_step = 2 * RELEASED_PARAMS / (BANDWIDTH_USE * H100_HBM_BYTES_PER_S)
    t_pass = 2 * RELEASED_PARAMS * RELEASED_N_CTX / (FLOP_USE * H100_BF16_FLOP_PER_S)
    t_draft = max(2 * drafter_weights_read() / (BANDWIDTH_USE * H100_HBM_BYTES_PER_S),
                  DRAFTER_KERNELS * KERNEL_LATENCY_S)
    ar = RELEASED_HOP_NEW * t_step
    spec = (RELEASED_HOP_NEW / tokens_per_call * t_step + student_passes * t_pass
            + drafter_steps * RELEASED_HOP_NEW * t_draft)
    return dict(t_step_ms=t_step * 1e3, t_pass_ms=t_pass * 1e3, t_draft_ms=t_draft * 1e3, ar_ms=ar * 1e3,
                speculative_ms=spec * 1e3, speedup=ar / spec, tokens_per_call=tokens_per_call,
                student_passes=student_passes, drafter_steps_per_token=drafter_steps)


def _chord_audio(seconds: float) -> torch.Tensor:
    """A four-voice I-IV-V-I progression in C major (string quartet timbres), mono float in [-1, 1]."""
    from fastjukebox.demo.synth import render
    chords = [(48, 55, 64, 72), (53, 57, 65, 72), (55, 59, 67, 74), (48, 55, 64, 72)]
    step = seconds / len(chords)
    notes = [(i * step, step, p, v) for i, ch in enumerate(chords) for v, p in enumerate(ch)]
    onset, duration, pitch, voice = (np.array(x) for x in zip(*notes))
    pcm = render(onset, duration, pitch, voice, ["cello", "viola", "violin", "violin"], seed=0)
    return torch.from_numpy(pcm.astype(np.float32) / 32768.0)


class Window:
    """Inputs of the first and the hopped window of one level at one batch size."""

    def __init__(self, jb, level: int, batch: int, codes: list[torch.Tensor]):
        from fastjukebox.generate import make_labels
        from fastjukebox.labels import window_labels
        c = jb.prior(level).config
        self.level, self.batch, self.config = level, batch, c
        total = (c.n_ctx + HOP) * c.raw_to_tokens
        labels = make_labels(jb, artist=1, genre=0, lyrics="", n_samples=batch, total_length=total)[level]
        up = codes[level + 1].expand(batch, -1)
        self.upper = {start: up[:, start // c.cond_downsample:(start + c.n_ctx) // c.cond_downsample]
                      for start in (0, HOP)}
        self.labels = {start: window_labels(labels, start, c.raw_to_tokens, c.sample_length) for start in (0, HOP)}
        self.known = {0: torch.zeros(batch, 0, dtype=torch.long)}

    def args(self, start: int):
        known = self.known[start]
        return known, self.config.n_ctx - known.shape[1], self.upper[start], self.labels[start]


def _timed(fn) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(levels=(0, 1), batches=(1, 16), gammas=(4, 8, 16), repeats: int = 2, seed: int = 0) -> dict:
    import fastjukebox
    from distill.speculative import SpeculativeWindowSampler
    from fastjukebox.sampling import ARWindowSampler
    torch.set_num_threads(1)
    jb = fastjukebox.load("demo")
    with torch.no_grad():
        codes = jb.vqvae.encode(_chord_audio(2.0)[None])
    rows = []
    jobs = [(l, b) for l in levels for b in batches]
    n_variants = len(gammas) + (len(POLICIES) - 1 if 8 in gammas else 0)
    bar = progress_bar(len(jobs) * 2 * repeats * (1 + n_variants), "speculative benchmark", "window")
    for level, batch in jobs:
        prior = jb.prior(level)
        win = Window(jb, level, batch, codes)
        ar = ARWindowSampler(prior, batch)
        variants = [(g, DEFAULT_POLICY) for g in gammas]
        variants += [(8, name) for name in POLICIES if name != DEFAULT_POLICY and 8 in gammas]
        samplers = {v: SpeculativeWindowSampler(prior, jb.student(level), gamma=v[0], **POLICIES[v[1]])
                    for v in variants}
        if jb.drafter(level) is not None:       # the feature drafter at every gamma
            samplers.update({(g, DRAFTER): SpeculativeWindowSampler(prior, drafter=jb.drafter(level), gamma=g)
                             for g in gammas})
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            first = ar(*win.args(0), temperature=DEFAULT_TEMPERATURE, generator=gen)
        win.known[HOP] = first[:, HOP:]
        for start, kind in ((0, "first"), (HOP, "hopped")):
            times = {"ar": []} | {v: [] for v in samplers}
            reports = {v: [] for v in samplers}
            for r in range(repeats):
                knobs = dict(temperature=DEFAULT_TEMPERATURE, generator=torch.Generator().manual_seed(seed + 1 + r))
                with torch.no_grad():
                    times["ar"].append(_timed(lambda: ar(*win.args(start), **knobs))[0])
                    bar.update(1)
                    for v, s in samplers.items():
                        knobs["generator"] = torch.Generator().manual_seed(seed + 1 + r)
                        times[v].append(_timed(lambda: s(*win.args(start), **knobs))[0])
                        reports[v].append(s.reports[-1])
                        bar.update(1)
            n_tok = batch * win.args(start)[1]
            ar_tps = n_tok / statistics.median(times["ar"])
            for (g, policy), rep in reports.items():
                tps = n_tok / statistics.median(times[g, policy])
                calls = statistics.mean(x.teacher_calls for x in rep)
                rows.append(dict(level=level, batch=batch, window=kind, new_tokens=n_tok // batch, gamma=g,
                                 policy=policy,
                                 ar_tokens_per_s=ar_tps, speculative_tokens_per_s=tps, ratio=tps / ar_tps,
                                 acceptance=statistics.mean(x.acceptance for x in rep),
                                 teacher_calls=calls, tokens_per_call=n_tok / batch / calls,
                                 student_passes=statistics.mean(x.student_passes for x in rep),
                                 drafter_steps_per_token=statistics.mean(x.drafter_steps for x in rep) / (n_tok // batch)))
    bar.close()
    return dict(rows=rows, projections=projections(rows), repeats=repeats,
                machine=dict(cpu=platform.processor() or platform.machine(), torch=torch.__version__,
                             threads=torch.get_num_threads()),
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def projections(rows: list[dict]) -> list[dict]:
    """``project_h100`` per level and gamma from the batch-1 hopped rows of the default policy."""
    out = []
    for r in rows:
        if r["window"] == "hopped" and r["batch"] == 1 and r["policy"] in (DEFAULT_POLICY, DRAFTER):
            out.append(dict(level=r["level"], gamma=r["gamma"], policy=r["policy"],
                            **project_h100(r["tokens_per_call"], r["student_passes"],
                                           r.get("drafter_steps_per_token", 0.0))))
    return out


def render_markdown(res: dict) -> str:
    lines = ["# Speculative sampling vs exact AR, demo upsamplers (CPU)", "",
             f"{res['date']}; torch {res['machine']['torch']}, {res['machine']['threads']} thread; "
             f"median of {res['repeats']} rounds; both samplers in the same run, temperature {DEFAULT_TEMPERATURE}. "
             "tokens/s = new tokens (all rows) per wall second of the window call (priming and drafts included).", "",
             "| level | batch | window | gamma | draft policy | ar tok/s | speculative tok/s | speculative / ar | "
             "acceptance | tokens per teacher call | student passes | drafter steps per token |",
             "|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['level']} | {r['batch']} | {r['window']} ({r['new_tokens']} new) | {r['gamma']} | "
                     f"{r['policy']} | "
                     f"{r['ar_tokens_per_s']:.0f} | {r['speculative_tokens_per_s']:.0f} | **{r['ratio']:.2f}x** | "
                     f"{r['acceptance']:.2f} | {r['tokens_per_call']:.2f} | {r['student_passes']:.0f} | "
                     f"{r.get('drafter_steps_per_token', 0.0):.2f} |")
    if res["projections"]:
        lines += ["", "## Projection (not measured): one H100, released upsampler size, batch 1, hopped window", "",
                  "From the batch-1 hopped rows above (the student's default draft policy and the feature drafter), "
                  "assuming the released student's or drafter's drafts are accepted as often as the demo's at the "
                  "same level:", "",
                  "- t_step = 2 P / (0.8 x 3.35 TB/s) = " f"{project_h100(1, 0)['t_step_ms']:.3f} ms "
                  "(P = 981,298,176 bf16 weights, read once per AR step or per teacher chunk of <= 16 positions)",
                  "- t_pass = 2 P n_ctx / (0.5 x 989 TFLOP/s) = " f"{project_h100(1, 0)['t_pass_ms']:.1f} ms "
                  "(a student pass over the n_ctx = 8192 window)",
                  "- t_draft = max(2 D / (0.8 x 3.35 TB/s), 16 kernels x 4 us) = "
                  f"{project_h100(1, 0)['t_draft_ms']:.3f} ms (a feature-drafter position; D = "
                  f"{drafter_weights_read():,} weights read at width 1920, 2048 codes, one MLP block of 512)",
                  "- ar = 4096 t_step; speculative = 4096 / (tokens per teacher call) x t_step + "
                  "(student passes) x t_pass + (drafter steps per token) x 4096 x t_draft", "",
                  "| level | gamma | draft | tokens per teacher call | ar ms / window | speculative ms / window | "
                  "projected speculative / ar |", "|---:|---:|---|---:|---:|---:|---:|"]
        for p in res["projections"]:
            lines.append(f"| {p['level']} | {p['gamma']} | {p['policy']} | {p['tokens_per_call']:.2f} | {p['ar_ms']:.0f} | "
                         f"{p['speculative_ms']:.0f} | {p['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


CROSSOVER_BATCHES = (1, 2, 3, 4, 8, 16)


def crossover_batch(rows: list[dict]) -> int | None:
    """The rule behind ``distill.speculative.DISABLE_AT_BATCH``, fixed before the measurement: the
    smallest measured batch size from which speculation is slower than ``"ar"`` (ratio < 1) at
    every level, at that batch and every larger one measured; None if there is none."""
    batches = sorted({r["batch"] for r in rows})
    slower = {b: all(r["ratio"] < 1.0 for r in rows if r["batch"] == b) for b in batches}
    for i, b in enumerate(batches):
        if all(slower[c] for c in batches[i:]):
            return b
    return None


def crossover(levels=(0, 1), batches=CROSSOVER_BATCHES, repeats: int = 3, seed: int = 0) -> dict:
    """Per level and batch size: the hopped window sampled by ``"ar"`` and by ``"speculative"``
    with the level's feature drafter at gamma ``GAMMA`` (always speculating), rounds alternating;
    medians of the window's wall time."""
    import fastjukebox
    from distill.speculative import GAMMA, SpeculativeWindowSampler
    from fastjukebox.sample_seeds import SampleGenerators
    from fastjukebox.sampling import ARWindowSampler
    torch.set_num_threads(1)
    jb = fastjukebox.load("demo")
    with torch.no_grad():
        codes = jb.vqvae.encode(_chord_audio(2.0)[None])
    rows = []
    bar = progress_bar(len(levels) * len(batches) * repeats * 2, "speculation crossover", "window")
    for level in levels:
        prior = jb.prior(level)
        for batch in batches:
            win = Window(jb, level, batch, codes)
            ar = ARWindowSampler(prior, batch)
            knobs = dict(temperature=DEFAULT_TEMPERATURE)
            with torch.no_grad():
                win.known[HOP] = ar(*win.args(0), **knobs, generator=torch.Generator().manual_seed(seed))[:, HOP:]
            spec = SpeculativeWindowSampler(prior, drafter=jb.drafter(level), gamma=GAMMA)
            times = {"ar": [], "speculative": []}
            for r in range(repeats):
                seeds = [seed + 1 + r * batch + i for i in range(batch)]
                for name, sampler in (("ar", ar), ("speculative", spec)):
                    with torch.no_grad():
                        times[name].append(_timed(lambda: sampler(*win.args(HOP), **knobs,
                                                                  generator=SampleGenerators(seeds)))[0])
                    bar.update(1)
            rep = spec.reports[-repeats:]
            calls = statistics.mean(x.teacher_calls for x in rep)
            t_ar, t_spec = statistics.median(times["ar"]), statistics.median(times["speculative"])
            rows.append(dict(level=level, batch=batch, gamma=GAMMA, ar_s=t_ar, speculative_s=t_spec,
                             ratio=t_ar / t_spec, acceptance=statistics.mean(x.acceptance for x in rep),
                             tokens_per_call=(win.config.n_ctx - HOP) / calls))
    bar.close()
    from .sampling_speed import machine
    return dict(rows=rows, crossover=crossover_batch(rows), repeats=repeats,
                machine=dict(cpu=machine()["cpu"], torch=torch.__version__,
                             threads=torch.get_num_threads()),
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def render_crossover(res: dict) -> str:
    lines = ["# Where speculation stops paying: batch size, demo upsamplers (CPU)", "",
             f"{res['date']}; {res['machine']['cpu']}, torch {res['machine']['torch']}, "
             f"{res['machine']['threads']} thread; hopped window ({HOP} new positions per row), feature drafter, "
             f"median of {res['repeats']} rounds, rounds alternating the samplers. Ratio: `ar`'s wall time over "
             "`speculative`'s.", "",
             "    OMP_NUM_THREADS=1 python -m benchmarks speculative --crossover", "",
             "| level | batch | gamma | ar s | speculative s | speculative / ar | acceptance | positions per call |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['level']} | {r['batch']} | {r['gamma']} | {r['ar_s']:.3f} | {r['speculative_s']:.3f} | "
                     f"**{r['ratio']:.2f}x** | {r['acceptance']:.2f} | {r['tokens_per_call']:.2f} |")
    lines += ["", "Rule (`crossover_batch`, fixed before the measurement): the smallest batch from which "
              "speculation is slower than `ar` at every level, there and at every larger batch measured. "
              f"Here: **{res['crossover']}** (`distill.speculative.DISABLE_AT_BATCH['cpu']`)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks speculative", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="level 0, batch 1, gamma 8, one round; writes *-quick files")
    ap.add_argument("--crossover", action="store_true",
                    help="feature drafter vs ar at batch 1 to 16, both levels: writes speculative-crossover-cpu.*")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default: 2; --crossover: 3)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.crossover:
        res = crossover(repeats=args.repeats or 3)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "speculative-crossover-cpu.json").write_text(json.dumps(res, indent=1))
        text = render_crossover(res)
        (args.out / "speculative-crossover-cpu.md").write_text(text)
        print(text)
        return 0
    if args.quick:
        res = run(levels=(0,), batches=(1,), gammas=(8,), repeats=1)
    else:
        res = run(repeats=args.repeats or 2)
    name = "speculative-cpu-quick" if args.quick else "speculative-cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(res, indent=1))
    (args.out / f"{name}.md").write_text(render_markdown(res))
    print(render_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
