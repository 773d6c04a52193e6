"""Evaluate a parallel student against its autoregressive teacher on held-out upper codes.

    python -m distill.evaluate --student RUN/student [--model demo|PATH] [--data DIR] [--out DIR]

For ``--windows`` held-out windows (demo corpus "heldout" split, or the held-out tail of each
``--data`` file; never seen in training, nor by any setting chosen after it) the VQ-VAE gives
the real codes and the upper codes (``--upper real``, the encoding; or ``--upper sampled``: the
upper teacher samples them from the real codes two levels up, ``distill.data.sampled_upper_windows``,
the conditioning a user's windows get). Two settings, each judged from both sides:

* ``scratch``: the window from nothing (a level's first window). The teacher samples two
  windows per conditioning (A and B), the student one.
* ``hopped``: the first half given by the teacher (A's first half), the rest sampled: by the
  teacher twice (continuations A' and B') and by the student once. This is every window of a
  level after the first; only the new half is scored.

Reported per setting (``settings.scratch`` / ``settings.hopped`` of eval.json; eval.md, eval.png):

* ``teacher_nll_{student,teacher,real}``: teacher-forced NLL under the teacher, bits/token, of
  the student's samples, the teacher's own samples (A) and the real codes; ``nll_ratio``.
* ``c2st_accuracy`` (+ ``c2st_stderr``): classifier two-sample test (``distill.two_sample``):
  a small network trained on half of the windows to tell teacher samples (A) from student
  samples of the same conditioning, scored on the other half (0.5: indistinguishable);
  ``c2st_null_accuracy``: the same test between the teacher's two samples (A vs B), the level a
  perfect student would reach with these windows.
* ``tv_mean`` (+ ``tv_stderr``, ``tv_profile``): per-position total variation between the
  student's and the teacher's next-token distributions along the teacher's samples
  (``metrics.next_token_tv``), the rejection rate of an exact speculative verifier;
  ``entropy_next_{student,teacher}``: entropies of those distributions (bits).
* ``entropy_{student,teacher}``: entropy (bits) of the teacher's predictive distribution along
  the samples; ``unigram_entropy_*``; ``codebook_usage_*`` (distinct codes) and
  ``histogram_*`` (code counts), ``histogram_tv`` between them.
* ``passes_per_window_*`` (counted model evaluations), ``seconds_per_window_*``: wall time to
  sample all windows divided by their number, batches of ``--batch-size``, after one warm-up
  batch each, in the same run on the same device; ``speedup_wallclock`` = teacher / student.

``spectral_distance_ratio`` (scratch): mean multi-resolution STFT distance between the
student's and teacher A's decoded audio over the same between teacher B and teacher A.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from fastjukebox.atomic import atomic_path
from fastjukebox.cli_options import HelpFormatter, run_command

from .data import UPPER_SOURCES, load_pieces, real_windows, sample_teacher, sample_windows, sampled_upper_windows
from .metrics import (CallCounter, code_histogram, codebook_usage, default_fft_sizes, histogram_tv, mr_stft_distance,
                      next_token_tv, teacher_scores, unigram_entropy_bits)
from .two_sample import classifier_two_sample_test

REQUIRED_KEYS = ("spectral_distance_ratio", "k", "device", "level", "n_ctx", "windows", "settings")
SETTINGS = ("scratch", "hopped")
SETTING_KEYS = ("known", "teacher_nll_student", "teacher_nll_teacher", "teacher_nll_real", "nll_ratio",
                "c2st_accuracy", "c2st_stderr", "c2st_null_accuracy", "tv_mean", "tv_stderr", "entropy_next_student",
                "entropy_next_teacher", "entropy_student", "entropy_teacher", "codebook_usage_student",
                "codebook_usage_teacher", "codebook_usage_ratio", "histogram_tv", "passes_per_window_student",
                "passes_per_window_teacher", "seconds_per_window_student", "seconds_per_window_teacher",
                "speedup_wallclock")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - t


def _first(x, n):
    return None if x is None else x[:n]


@torch.no_grad()
def _compare(prior, student, sampler, w, teacher_a, known: int, *, temperature, bs, gen, decoders, c2st_steps,
             tv_positions, seed, dev, step) -> tuple[dict, dict]:
    """One setting: teacher and student samples continuing ``teacher_a[:, :known]`` (nothing when
    ``known`` is 0; then ``teacher_a`` itself is the teacher's sample A). Returns the setting's
    measures and its samples."""
    c = prior.config
    windows = w.upper.shape[0]
    prefix = teacher_a[:, :known] if known else None
    n_batches = math.ceil(windows / bs)
    teach = lambda: sample_teacher(prior, w.upper, w.labels, temperature=temperature, batch_size=bs, generator=gen,
                                   decoders=decoders, known=prefix)
    # warm-ups (caches, allocator), then the timed runs on all windows
    sample_teacher(prior, w.upper[:bs], _first(w.labels, bs), temperature=temperature, batch_size=bs, generator=gen,
                   decoders=decoders, known=_first(prefix, bs))
    with CallCounter(prior.prior.x_emb) as calls_t:
        sample_a, t_teacher = _timed(teach, dev)
    if not known:
        sample_a = teacher_a
    sample_b = teach()
    student_fill = lambda upper, labels, pre: sample_windows(
        sampler, c.n_ctx, upper, labels, temperature=temperature, batch_size=bs, generator=gen, device=dev, known=pre)
    student_fill(w.upper[:bs], _first(w.labels, bs), _first(prefix, bs))
    step(f"student: sampling {windows} windows after {known} known codes ({sampler.passes} passes)")
    with CallCounter(student.prior) as calls_s:
        sample_s, t_student = _timed(lambda: student_fill(w.upper, w.labels, prefix), dev)

    step(f"scoring {windows} windows after {known} known codes: teacher NLL, two-sample test, TV")
    nll_s, ent_s = teacher_scores(prior, sample_s, w.upper, w.labels, bs, start=known)
    nll_t, ent_t = teacher_scores(prior, sample_a, w.upper, w.labels, bs, start=known)
    nll_r, _ = teacher_scores(prior, w.real, w.upper, w.labels, bs, start=known)
    c2st = classifier_two_sample_test(sample_a, sample_s, l_bins=c.l_bins, upper=w.upper, upper_bins=c.l_bins,
                                      steps=c2st_steps, seed=seed)
    null = classifier_two_sample_test(sample_a, sample_b, l_bins=c.l_bins, upper=w.upper, upper_bins=c.l_bins,
                                      steps=c2st_steps, seed=seed)
    tv = next_token_tv(prior, student, sample_a, w.upper, w.labels, known=known, positions=tv_positions,
                       generator=torch.Generator().manual_seed(seed))
    new_s, new_t = sample_s[:, known:], sample_a[:, known:]
    hist_s, hist_t = code_histogram(new_s, c.l_bins), code_histogram(new_t, c.l_bins)
    use_s, use_t = codebook_usage(new_s), codebook_usage(new_t)
    r = dict(known=known, teacher_nll_student=nll_s, teacher_nll_teacher=nll_t, teacher_nll_real=nll_r,
             nll_ratio=nll_s / max(nll_t, 1e-12),
             c2st_accuracy=c2st["accuracy"], c2st_stderr=c2st["stderr"], c2st_n_test=c2st["n_test"],
             c2st_null_accuracy=null["accuracy"], c2st_null_stderr=null["stderr"],
             tv_mean=tv["mean_tv"], tv_stderr=tv["stderr"], tv_profile=tv["profile"], tv_positions=tv["positions"],
             entropy_next_student=tv["entropy_student"], entropy_next_teacher=tv["entropy_teacher"],
             entropy_student=ent_s, entropy_teacher=ent_t,
             unigram_entropy_student=unigram_entropy_bits(new_s, c.l_bins),
             unigram_entropy_teacher=unigram_entropy_bits(new_t, c.l_bins),
             codebook_usage_student=use_s, codebook_usage_teacher=use_t, codebook_usage_real=codebook_usage(w.real[:, known:]),
             codebook_usage_ratio=use_s / max(use_t, 1), histogram_student=hist_s, histogram_teacher=hist_t,
             histogram_tv=histogram_tv(hist_s, hist_t),
             passes_per_window_student=calls_s.count / n_batches, passes_per_window_teacher=calls_t.count / n_batches,
             seconds_per_window_student=t_student / windows, seconds_per_window_teacher=t_teacher / windows,
             speedup_wallclock=t_teacher / max(t_student, 1e-12))
    return r, dict(student=sample_s, a=sample_a, b=sample_b)


@torch.no_grad()
def evaluate(jb, student, *, data=None, windows: int = 64, passes: int | None = None, batch_size: int = 16,
             temperature: float = 1.0, seed: int = 0, out=None, progress: bool = True, c2st_steps: int = 300,
             tv_positions: int = 8, upper: str = "real") -> dict:
    """Run the comparison described in the module docstring; write eval.json, eval.md and
    eval.png into ``out`` (if given) and return the results. ``passes`` None: the student's own;
    ``upper``: where the windows' upper codes come from (``UPPER_SOURCES``)."""
    from .sampler import ParallelWindowSampler

    level = student.config.level
    prior = jb.prior(level).eval()
    student = student.eval()
    c = prior.config
    if student.config.n_ctx != c.n_ctx or student.config.l_bins != c.l_bins:
        raise ValueError(f"the student (n_ctx {student.config.n_ctx}, {student.config.l_bins} codes) does not match "
                         f"the level-{level} teacher (n_ctx {c.n_ctx}, {c.l_bins} codes)")
    if upper not in UPPER_SOURCES:
        raise ValueError(f"upper must be one of {', '.join(UPPER_SOURCES)}, got {upper!r}")
    if upper == "sampled" and level + 1 not in jb.upsampler_levels:
        raise ValueError(f"sampled upper codes need the level-{level + 1} upsampler, which this family "
                         f"does not have below its top level")
    if windows < 4 or batch_size < 1 or (passes is not None and passes < 1):
        raise ValueError(f"windows must be >= 4 (the two-sample test splits them), batch_size >= 1 and passes >= 1; "
                         f"got windows={windows}, batch_size={batch_size}, passes={passes}")
    sampler = ParallelWindowSampler(student, passes=passes)
    dev = prior.device
    step = lambda msg: print(f"[evaluate] {msg}", file=sys.stderr) if progress else None

    step(f"encoding {windows} held-out level-{level} windows" + (" (upper codes sampled)" if upper == "sampled" else ""))
    pieces = load_pieces(data, "heldout", jb.sr)
    g_windows = torch.Generator().manual_seed(seed)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    bs = min(batch_size, windows)
    decoders: dict = {}
    if upper == "sampled":
        w = sampled_upper_windows(jb.vqvae, prior, jb.prior(level + 1).eval(), pieces, windows, g_windows,
                                  temperature=temperature, batch_size=bs, sample_generator=gen)
    else:
        w = real_windows(jb.vqvae, prior, pieces, windows, g_windows)
    kw = dict(temperature=temperature, bs=bs, gen=gen, decoders=decoders, c2st_steps=c2st_steps,
              tv_positions=tv_positions, seed=seed, dev=dev, step=step)
    step(f"teacher: sampling {windows} windows (autoregressive)")
    teacher_a = sample_teacher(prior, w.upper, w.labels, temperature=temperature, batch_size=bs, generator=gen,
                               decoders=decoders)
    settings, samples = {}, {}
    for name, known in (("scratch", 0), ("hopped", c.n_ctx // 2)):
        settings[name], samples[name] = _compare(prior, student, sampler, w, teacher_a, known, **kw)

    step("decoding audio")
    s = samples["scratch"]
    audio = {k: jb.vqvae.decode(z.to(dev), level).float().cpu() for k, z in s.items()}
    sizes = default_fft_sizes(audio["a"].shape[1])
    d_student = float(mr_stft_distance(audio["student"], audio["a"], sizes).mean())
    d_teacher = float(mr_stft_distance(audio["b"], audio["a"], sizes).mean())
    own = student.sampling
    result = dict(
        settings=settings,
        spectral_distance_student_teacher=d_student, spectral_distance_teacher_teacher=d_teacher,
        spectral_distance_ratio=d_student / max(d_teacher, 1e-12), fft_sizes=list(sizes),
        k=sampler.passes, confidence_noise=sampler.confidence_noise, prefix_cache=sampler.prefix_cache,
        sampling_settings_source="the student's sampling.json (chosen on training shards)"
        if passes is None else f"passes={passes} given; the rest from the student's sampling.json",
        student_sampling=dict(passes=own.passes, confidence_noise=own.confidence_noise,
                              prefix_cache=own.prefix_cache, temperature_anneal=own.temperature_anneal),
        device=str(dev), level=level, n_ctx=c.n_ctx, windows=windows, batch_size=bs, c2st_steps=c2st_steps,
        temperature=temperature, l_bins=c.l_bins, data=str(data) if data else "demo-corpus (heldout)",
        upper=upper)
    if out is not None:
        write_report(result, Path(out))
    return result


def format_markdown(r: dict) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    pm = lambda v, e: f"{v:.3f} +- {e:.3f}"
    lines = [f"## Student vs teacher, level {r['level']} ({r['windows']} held-out windows, "
             f"upper codes {r.get('upper', 'real')}, n_ctx {r['n_ctx']}, "
             f"K = {r['k']} passes, choice noise {r['confidence_noise']:g}, prefix cache {r['prefix_cache']}, "
             f"{r['device']})", "", f"Sampling settings: {r['sampling_settings_source']}.", ""]
    if r.get("upper") == "sampled":
        lines += ["The `real` column scores the encoded codes under sampled upper codes they do not belong to "
                  "(a reference point, not a target).", ""]
    for name, s in r["settings"].items():
        what = "from scratch" if not s["known"] else f"hopped: first {s['known']} codes given by the teacher"
        rows = [
            ("teacher NLL of the new codes (bits/token)", s["teacher_nll_student"], s["teacher_nll_teacher"],
             s["teacher_nll_real"]),
            ("teacher predictive entropy (bits)", s["entropy_student"], s["entropy_teacher"], ""),
            ("next-token entropy along teacher samples (bits)", s["entropy_next_student"], s["entropy_next_teacher"], ""),
            ("empirical code entropy (bits)", s["unigram_entropy_student"], s["unigram_entropy_teacher"], ""),
            ("codebook usage (distinct codes)", s["codebook_usage_student"], s["codebook_usage_teacher"],
             s["codebook_usage_real"]),
            ("sequential passes / window", s["passes_per_window_student"], s["passes_per_window_teacher"], ""),
            ("seconds / window", s["seconds_per_window_student"], s["seconds_per_window_teacher"], ""),
        ]
        lines += [f"### {name} ({what})", "", "| measure | student | teacher | real |", "|---|---:|---:|---:|"]
        lines += [f"| {m} | {fmt(a)} | {fmt(b)} | {fmt(x)} |" for m, a, b, x in rows]
        lines += ["", f"- teacher NLL ratio (student / teacher samples): **{s['nll_ratio']:.3f}**",
                  f"- classifier two-sample test, held-out accuracy teacher vs student: "
                  f"**{pm(s['c2st_accuracy'], s['c2st_stderr'])}** ({s['c2st_n_test']} held-out windows; "
                  f"teacher vs teacher: {pm(s['c2st_null_accuracy'], s['c2st_null_stderr'])})",
                  f"- next-token total variation along teacher samples: **{pm(s['tv_mean'], s['tv_stderr'])}** "
                  f"(by position span: {', '.join(f'{v:.2f}' for v in s['tv_profile'])})",
                  f"- code histogram total variation: {s['histogram_tv']:.3f}; codebook usage ratio "
                  f"{s['codebook_usage_ratio']:.3f}",
                  f"- wall-clock speedup vs the autoregressive teacher: **{s['speedup_wallclock']:.2f}x**", ""]
    lines += [f"- spectral distance ratio (scratch; student-teacher / teacher-teacher, 1.0 = indistinguishable): "
              f"**{r['spectral_distance_ratio']:.3f}** ({r['spectral_distance_student_teacher']:.4g} / "
              f"{r['spectral_distance_teacher_teacher']:.4g}, FFT sizes {r['fft_sizes']})", ""]
    return "\n".join(lines)


def plot_report(r: dict, png: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'fastjukebox[plots]'): no plot written", file=sys.stderr)
        return None
    names = list(r["settings"])
    fig, axes = plt.subplots(len(names), 3, figsize=(13, 3.3 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        s = r["settings"][name]
        a, b, h = row
        a.bar(["student", "teacher", "real"], [s["teacher_nll_student"], s["teacher_nll_teacher"],
                                               s["teacher_nll_real"]], color=["tab:orange", "tab:blue", "tab:green"])
        a.set_title(f"{name}: teacher NLL (bits/token)")
        b.plot(s["tv_profile"], marker="o")
        b.set_ylim(0, 1)
        b.set_title(f"{name}: next-token TV by position span (mean {s['tv_mean']:.2f})")
        order = sorted(range(len(s["histogram_teacher"])), key=lambda i: -s["histogram_teacher"][i])
        h.plot([s["histogram_teacher"][i] for i in order], label="teacher", color="tab:blue")
        h.plot([s["histogram_student"][i] for i in order], label="student", color="tab:orange", alpha=0.8)
        h.set_yscale("log")
        h.set_title(f"{name}: code counts (teacher's order), TV {s['histogram_tv']:.2f}")
        h.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png

def write_report(r: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "eval.json") as tmp:
        tmp.write_text(json.dumps(r, indent=1))
    with atomic_path(out / "eval.md") as tmp:
        tmp.write_text(format_markdown(r))
    plot_report(r, out / "eval.png")


def _student_dir(path: str) -> Path:
    p = Path(path)
    if (p / "student" / "config.json").is_file():      # a training run directory
        return p / "student"
    if not p.exists():
        raise ValueError(f"--student {p}: no such directory; train a student first "
                         f"(python -m distill.train --teacher middle --out {p.parent if p.name == 'student' else p})")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--student", required=True, help="student directory (or a distill.train run directory)")
    p.add_argument("--model", default="demo", help="teacher model directory or bundled name")
    p.add_argument("--data", default=None, help="audio directory (default: the demo corpus, held-out split)")
    p.add_argument("--out", default=None, help="output directory (default: ./distill-eval-<time>)")
    p.add_argument("--windows", type=int, default=64, help="held-out windows (half train the two-sample classifier)")
    p.add_argument("--passes", type=int, default=None, help="student passes per window (K; default: the student's own)")
    p.add_argument("--c2st-steps", type=int, default=300, help="training steps of the two-sample classifier")
    p.add_argument("--batch-size", type=int, default=16, help="windows sampled together")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of teacher and student")
    p.add_argument("--seed", type=int, default=1, help="seed of the windows and of the samples")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--upper", choices=UPPER_SOURCES, default="real",
                   help="the windows' upper codes: real (encoded) or sampled by the upper teacher, as in a user's "
                        "upsample (level 0 only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: shown)")
    return p


def _run(args) -> int:
    import fastjukebox as fj
    from fastjukebox.settings import check_count, check_device
    from .student import ParallelStudent
    device = str(check_device(args.device)) if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("windows", "c2st_steps", "batch_size"):
        check_count(getattr(args, name), f"--{name.replace('_', '-')}")
    check_count(args.passes, "--passes", allow_none=True)
    if not 0 <= args.temperature < float("inf"):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    student = ParallelStudent.load(_student_dir(args.student), device=device)
    jb = fj.load(args.model, device=device)
    out = Path(args.out) if args.out else Path.cwd() / f"distill-eval-{datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a directory")
    r = evaluate(jb, student, data=args.data, windows=args.windows, passes=args.passes, batch_size=args.batch_size,
                 temperature=args.temperature, seed=args.seed, out=out, progress=not args.quiet,
                 c2st_steps=args.c2st_steps, upper=args.upper)
    print(format_markdown(r))
    print(f"written: {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Bad input is one line on stderr and exit status 2."""
    return run_command(_run, build_parser().parse_args(argv), "python -m distill.evaluate")


if __name__ == "__main__":
    sys.exit(main())
