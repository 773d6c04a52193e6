"""Evaluate a parallel student against its autoregressive teacher on held-out upper codes.

    python -m distill.evaluate --student RUN/student [--model demo|PATH] [--data DIR] [--out DIR]

For ``--windows`` held-out windows (demo corpus "heldout" split, or the held-out tail of each
``--data`` file) the VQ-VAE gives the real codes and the upper codes; then, from the same upper
codes and labels, the teacher samples two windows each (A and B, autoregressively) and the
student one (``--passes`` parallel passes). Reported (eval.json, eval.md, eval.png):

* ``teacher_nll_{student,teacher,real}``: teacher-forced NLL under the teacher, bits/token, of
  the student's samples, the teacher's own samples (A) and the real codes.
* ``codebook_usage_{student,teacher}``: distinct codes over all windows.
* ``entropy_{student,teacher}``: mean entropy (bits) of the teacher's predictive distribution
  along the samples (how sure the teacher is of what comes next);
  ``unigram_entropy_{student,teacher}``: entropy of the sampled codes' empirical distribution.
* ``spectral_distance_ratio``: mean multi-resolution STFT distance between the student's and
  teacher A's decoded audio, divided by the same between teacher B and teacher A (1.0: as close
  to the teacher as another teacher sample is).
* ``passes_per_window_*``: sequential model evaluations per window, counted (teacher: one per
  token; student: one per pass); ``seconds_per_window_*``: wall time to sample all windows
  divided by their number, batches of ``--batch-size``, after one warm-up batch each, in the
  same run on the same device; ``speedup_wallclock`` = teacher / student seconds.
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

from .data import load_pieces, real_windows, sample_teacher, sample_windows
from .metrics import (CallCounter, codebook_usage, default_fft_sizes, mr_stft_distance, teacher_scores,
                      unigram_entropy_bits)

REQUIRED_KEYS = ("teacher_nll_student", "teacher_nll_teacher", "teacher_nll_real", "codebook_usage_student",
                 "codebook_usage_teacher", "entropy_student", "entropy_teacher", "spectral_distance_ratio",
                 "passes_per_window_student", "passes_per_window_teacher", "seconds_per_window_student",
                 "seconds_per_window_teacher", "speedup_wallclock", "k", "device")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_student(sampler, upper: torch.Tensor, labels: torch.Tensor | None, *, temperature: float,
                   batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
    """Whole windows (S, n_ctx) from the student, nothing known, in batches."""
    return sample_windows(sampler, sampler.config.n_ctx, upper, labels, temperature=temperature,
                          batch_size=batch_size, generator=generator,
                          device=sampler.student.prior.x_emb.weight.device)


def _timed(fn, device):
    _sync(device)
    t = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - t


@torch.no_grad()
def evaluate(jb, student, *, data=None, windows: int = 16, passes: int = 16, batch_size: int = 16,
             temperature: float = 1.0, seed: int = 0, out=None, progress: bool = True) -> dict:
    """Run the comparison described in the module docstring; write eval.json, eval.md and
    eval.png into ``out`` (if given) and return the results."""
    from .sampler import ParallelWindowSampler

    level = student.config.level
    prior = jb.prior(level).eval()
    student = student.eval()
    c = prior.config
    if student.config.n_ctx != c.n_ctx or student.config.l_bins != c.l_bins:
        raise ValueError(f"the student (n_ctx {student.config.n_ctx}, {student.config.l_bins} codes) does not match "
                         f"the level-{level} teacher (n_ctx {c.n_ctx}, {c.l_bins} codes)")
    if windows < 1 or passes < 1 or batch_size < 1:
        raise ValueError("windows, passes and batch_size must be >= 1")
    dev = prior.prior.x_emb.weight.device
    step = lambda msg: print(f"[evaluate] {msg}", file=sys.stderr) if progress else None

    step(f"encoding {windows} held-out level-{level} windows")
    pieces = load_pieces(data, "heldout", jb.sr)
    w = real_windows(jb.vqvae, prior, pieces, windows, torch.Generator().manual_seed(seed))
    gen = torch.Generator(device=dev)
    bs = min(batch_size, windows)
    decoders: dict = {}

    # warm-ups (caches, allocator), then the timed runs on all windows
    gen.manual_seed(seed)
    sample_teacher(prior, w.upper[:bs], None if w.labels is None else w.labels[:bs], temperature=temperature,
                   batch_size=bs, generator=gen, decoders=decoders)
    step(f"teacher: sampling {windows} windows x 2 (autoregressive)")
    with CallCounter(prior.prior.x_emb) as calls_t:
        teacher_a, t_teacher = _timed(lambda: sample_teacher(
            prior, w.upper, w.labels, temperature=temperature, batch_size=bs, generator=gen, decoders=decoders), dev)
    teacher_b = sample_teacher(prior, w.upper, w.labels, temperature=temperature, batch_size=bs, generator=gen,
                               decoders=decoders)
    sampler = ParallelWindowSampler(student, passes=passes)
    sample_student(sampler, w.upper[:bs], None if w.labels is None else w.labels[:bs], temperature=temperature,
                   batch_size=bs, generator=gen)
    step(f"student: sampling {windows} windows ({passes} passes)")
    with CallCounter(student.prior) as calls_s:
        student_z, t_student = _timed(lambda: sample_student(
            sampler, w.upper, w.labels, temperature=temperature, batch_size=bs, generator=gen), dev)
    n_batches = math.ceil(windows / bs)

    step("scoring under the teacher and decoding audio")
    nll_s, ent_s = teacher_scores(prior, student_z, w.upper, w.labels, bs)
    nll_t, ent_t = teacher_scores(prior, teacher_a, w.upper, w.labels, bs)
    nll_r, ent_r = teacher_scores(prior, w.real, w.upper, w.labels, bs)
    audio = {k: jb.vqvae.decode(z.to(dev), level).float().cpu()
             for k, z in (("student", student_z), ("a", teacher_a), ("b", teacher_b))}
    sizes = default_fft_sizes(audio["a"].shape[1])
    d_student = float(mr_stft_distance(audio["student"], audio["a"], sizes).mean())
    d_teacher = float(mr_stft_distance(audio["b"], audio["a"], sizes).mean())
    result = dict(
        teacher_nll_student=nll_s, teacher_nll_teacher=nll_t, teacher_nll_real=nll_r,
        codebook_usage_student=codebook_usage(student_z), codebook_usage_teacher=codebook_usage(teacher_a),
        codebook_usage_real=codebook_usage(w.real),
        entropy_student=ent_s, entropy_teacher=ent_t, entropy_real=ent_r,
        unigram_entropy_student=unigram_entropy_bits(student_z, c.l_bins),
        unigram_entropy_teacher=unigram_entropy_bits(teacher_a, c.l_bins),
        spectral_distance_student_teacher=d_student, spectral_distance_teacher_teacher=d_teacher,
        spectral_distance_ratio=d_student / max(d_teacher, 1e-12), fft_sizes=list(sizes),
        passes_per_window_student=calls_s.count / n_batches, passes_per_window_teacher=calls_t.count / n_batches,
        seconds_per_window_student=t_student / windows, seconds_per_window_teacher=t_teacher / windows,
        speedup_wallclock=t_teacher / max(t_student, 1e-12),
        k=passes, device=str(dev), level=level, n_ctx=c.n_ctx, windows=windows, batch_size=bs,
        temperature=temperature, l_bins=c.l_bins, data=str(data) if data else "demo-corpus (heldout)")
    if out is not None:
        write_report(result, Path(out))
    return result


def format_markdown(r: dict) -> str:
    rows = [
        ("teacher NLL (bits/token)", r["teacher_nll_student"], r["teacher_nll_teacher"], r["teacher_nll_real"]),
        ("teacher predictive entropy (bits)", r["entropy_student"], r["entropy_teacher"], r.get("entropy_real", "")),
        ("empirical code entropy (bits)", r["unigram_entropy_student"], r["unigram_entropy_teacher"], ""),
        ("codebook usage (distinct codes)", r["codebook_usage_student"], r["codebook_usage_teacher"],
         r.get("codebook_usage_real", "")),
        ("sequential passes / window", r["passes_per_window_student"], r["passes_per_window_teacher"], ""),
        ("seconds / window", r["seconds_per_window_student"], r["seconds_per_window_teacher"], ""),
    ]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [f"## Student vs teacher, level {r['level']} ({r['windows']} held-out windows, n_ctx {r['n_ctx']}, "
             f"K = {r['k']} passes, {r['device']})", "", "| measure | student | teacher | real |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {fmt(s)} | {fmt(t)} | {fmt(x)} |" for name, s, t, x in rows]
    lines += ["", f"- spectral distance ratio (student-teacher / teacher-teacher, 1.0 = indistinguishable): "
                  f"**{r['spectral_distance_ratio']:.3f}** ({r['spectral_distance_student_teacher']:.4g} / "
                  f"{r['spectral_distance_teacher_teacher']:.4g}, FFT sizes {r['fft_sizes']})",
              f"- wall-clock speedup vs the autoregressive teacher: **{r['speedup_wallclock']:.2f}x**", ""]
    return "\n".join(lines)


def plot_report(r: dict, png: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'fastjukebox[plots]'): no plot written", file=sys.stderr)
        return None
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 3.5))
    a.bar(["student", "teacher", "real"], [r["teacher_nll_student"], r["teacher_nll_teacher"], r["teacher_nll_real"]],
          color=["tab:orange", "tab:blue", "tab:green"])
    a.set_title("teacher NLL (bits/token)")
    b.bar(["student", "teacher"], [r["seconds_per_window_student"], r["seconds_per_window_teacher"]],
          color=["tab:orange", "tab:blue"])
    b.set_title(f"seconds / window ({r['speedup_wallclock']:.1f}x)")
    c.bar(["student-teacher", "teacher-teacher"], [r["spectral_distance_student_teacher"],
                                                   r["spectral_distance_teacher_teacher"]], color=["tab:orange", "tab:blue"])
    c.set_title(f"MR-STFT distance (ratio {r['spectral_distance_ratio']:.2f})")
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
    return p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="student directory (or a distill.train run directory)")
    p.add_argument("--model", default="demo", help="teacher model directory or bundled name (default: demo)")
    p.add_argument("--data", default=None, help="audio directory (default: the demo corpus, held-out split)")
    p.add_argument("--out", default=None, help="output directory (default: ./distill-eval-<time>)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--passes", type=int, default=16, help="student passes per window (K)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    import fastjukebox as fj
    from .student import ParallelStudent
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    student = ParallelStudent.load(_student_dir(args.student), device=device)
    jb = fj.load(args.model, device=device)
    out = Path(args.out) if args.out else Path.cwd() / f"distill-eval-{datetime.now():%Y%m%d-%H%M%S}"
    r = evaluate(jb, student, data=args.data, windows=args.windows, passes=args.passes, batch_size=args.batch_size,
                 temperature=args.temperature, seed=args.seed, out=out, progress=not args.quiet)
    print(format_markdown(r))
    print(f"written: {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
