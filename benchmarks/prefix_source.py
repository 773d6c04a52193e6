"""Where a parallel student's end-to-end gap at a level comes from: its own prefixes or its windows.

The main command's path for a shipped excerpt, upper levels by ``"ar"`` with one seed, the
level by ``"ar"``. At every window of the level the student also fills the window's new
positions from the *teacher's* known codes (the ``"ar"`` chain's prefix, the same upper codes and
labels); the teacher scores both fills teacher-forced (new positions only). A second run samples
the level with the student chained on its own prefixes (what ``--sampler 1=ar,0=parallel``
does) from the same upper codes. Per window, three teacher NLLs:

* ``ar``: the teacher's own window;
* ``teacher_prefix``: the student's fill after the teacher's prefix (held-out hopped windows
  measure this setting on training-like data);
* ``chained``: the student's fill after its own earlier windows (the end-to-end path).

If ``teacher_prefix`` is near ``ar`` and ``chained`` is not, the gap is exposure to the
student's own prefixes (training on its own windows is the lever); if both are far, it is the
window fill itself on this conditioning.

    OMP_NUM_THREADS=1 python -m benchmarks prefix-source --level 0 --batch 2
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


class TeacherPrefixed:
    """A window sampler that returns the teacher's (``"ar"``) window and, beside it, records the
    teacher NLL of the teacher's fill and of ``student``'s fill from the same known codes.

    ``windows`` holds one entry per window of the level with one value per sample; a window
    may come in several calls (samples with their own seeds are sampled one by one), so an entry
    is complete once it holds ``rows`` samples."""

    per_sample_generators = False

    def __init__(self, prior, ar, student, rows: int = 1):
        self.prior, self.ar, self.student, self.rows = prior, ar, student, rows
        self.windows: list[dict] = []

    def __call__(self, known, n_new, upper=None, labels=None, *, on_progress=None, **knobs):
        from distill.metrics import teacher_token_scores
        out = self.ar(known, n_new, upper, labels, **knobs)
        fill = self.student(known, n_new, upper, labels, **knobs)
        K = known.shape[1]
        if not self.windows or len(self.windows[-1]["ar"]) >= self.rows:
            self.windows.append({"known": K, "ar": [], "teacher_prefix": []})
        entry = self.windows[-1]
        for name, z in (("ar", out), ("teacher_prefix", fill)):
            nll, _ = teacher_token_scores(self.prior, z, upper, labels, start=K)
            entry[name] += nll.mean(dim=1).tolist()
        if on_progress is not None:
            on_progress(n_new)
        return out


def _run(jb, excerpt, level: int, upper: str, seconds, batch: int, **sampling):
    """The excerpt's path down to ``level``: upper levels sampled (``upper="sampled"``, as the main
    command does) or the excerpt's own encoded codes above ``level`` (``"real"``)."""
    from fastjukebox.demo.excerpts import excerpt_audio, upsample_excerpt
    if upper == "sampled":
        return upsample_excerpt(jb, excerpt, seconds=seconds, n_samples=batch, **sampling)
    audio = excerpt_audio(excerpt)
    if seconds is not None:
        audio = audio[: int(round(seconds * jb.sr))]
    top = jb.vqvae.config.levels - 1
    codes = jb.vqvae.encode(jb.vqvae.whole_top_codes(audio, f"excerpt {excerpt.name!r}"),
                            levels=tuple(range(level + 1, top + 1)))
    codes = [None if z is None else z.expand(batch, -1) for z in codes]
    return jb.continue_(codes, artist=excerpt.artist, genre=excerpt.genre, total_seconds=excerpt.piece_seconds,
                        offset_seconds=excerpt.offset_seconds, levels=(level,),
                        seconds=codes[top].shape[1] * jb.vqvae.hop_lengths[-1] / jb.sr, **sampling)


def measure(jb, excerpt, level: int, batch: int, seed: int, seconds: float | None, upper: str = "sampled") -> dict:
    """Per-window NLLs (bits per code) of the three fills (module docstring)."""
    from fastjukebox.sample_seeds import sample_seed
    from fastjukebox.samplers import build_window_samplers
    from fastjukebox.sampling import ARWindowSampler
    from benchmarks.upsample import level_teacher_nll
    prior = jb.prior(level)
    student = build_window_samplers(jb, {level: "parallel"}, {})[level]
    shadow = TeacherPrefixed(prior, ARWindowSampler(prior, 1), student, rows=batch)
    rows = [sample_seed(seed, i) for i in range(batch)]
    upper_sampler = {l: "ar" for l in jb.upsampler_levels if l > level} if upper == "sampled" else {}
    with torch.inference_mode():
        # the registry builds samplers by name: the shadow goes in through the level's factory
        from fastjukebox import samplers
        samplers.register_sampler("teacher-prefixed", lambda jb_, l: shadow)
        try:
            first = _run(jb, excerpt, level, upper, seconds, batch, seed=seed, sample_seeds=rows,
                         sampler={**upper_sampler, level: "teacher-prefixed"}, progress=False)
        finally:
            samplers.SAMPLERS.pop("teacher-prefixed", None)
            samplers.SAMPLER_OPTIONS.pop("teacher-prefixed", None)
        chained = _run(jb, excerpt, level, upper, seconds, batch, seed=seed, sample_seeds=rows,
                       sampler={**upper_sampler, level: "parallel"}, progress=False)
    if not torch.equal(first.codes[level + 1], chained.codes[level + 1]):
        raise RuntimeError("the two runs sampled different upper codes; the comparison needs the same")
    frac = first.settings["hop_fraction"]
    frac = frac[level] if isinstance(frac, dict) else frac
    hop = int(frac * prior.config.n_ctx)
    nll = level_teacher_nll(prior, chained.codes[level].cpu(), chained.codes[level + 1].cpu(),
                            chained.labels.get(level), hop)
    from fastjukebox.sampling import level_windows
    T = nll.shape[1]
    walked = level_windows(T, prior.config.n_ctx, hop, 0)
    if len(walked) != len(shadow.windows) or any(len(w["ar"]) != batch for w in shadow.windows):
        raise RuntimeError(f"the shadow sampler saw {len(shadow.windows)} windows, the level has {len(walked)}")
    for w, (start, known, new) in zip(shadow.windows, walked):
        w["chained"] = nll[:, start + known:start + prior.config.n_ctx].mean(dim=1).tolist()
        w["start"] = start
    return {"windows": shadow.windows, "codes": T, "hop": hop}


def summarise(windows: list[dict]) -> dict:
    """Mean NLL per fill and its ratio to ``ar``'s, over all windows and over the hopped ones,
    with the standard error of the per-window ratio's mean."""
    out = {}
    for part, rows in (("all", windows), ("hopped", [w for w in windows if w["known"] > 0]),
                       ("first", [w for w in windows if w["known"] == 0])):
        if not rows:
            continue
        entry = {"windows": len(rows)}
        ar = [v for w in rows for v in w["ar"]]
        entry["ar"] = sum(ar) / len(ar)
        for name in ("teacher_prefix", "chained"):
            vals = [v for w in rows for v in w[name]]
            ratios = [s / a for w in rows for s, a in zip(w[name], w["ar"])]
            m = sum(ratios) / len(ratios)
            var = sum((r - m) ** 2 for r in ratios) / max(len(ratios) - 1, 1)
            entry[name] = sum(vals) / len(vals)
            entry[name + "_ratio"] = entry[name] / entry["ar"]
            entry[name + "_ratio_se"] = math.sqrt(var / len(ratios))
        out[part] = entry
    return out


def render(summary: dict, meta: dict) -> str:
    lines = [f"# Level-{meta['level']} student: its own prefixes or its windows", "",
             f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, excerpt `{meta['excerpt']}`, batch "
             f"{meta['batch']}, seed {meta['seed']}, upper codes {meta['upper']}:", "", f"    {meta['command']}", "",
             "Teacher NLL, bits per code (new positions of each window), and its ratio to the teacher's own window "
             "(per-window ratios averaged, their standard error); `teacher_prefix`: the student after the teacher's "
             "known codes; `chained`: the student after its own earlier windows (the end-to-end path).", "",
             "| windows | n | ar | teacher_prefix (ratio ± se) | chained (ratio ± se) |", "|---|---:|---:|---:|---:|"]
    for part, e in summary.items():
        lines.append(f"| {part} | {e['windows']} | {e['ar']:.3f} | {e['teacher_prefix']:.3f} "
                     f"({e['teacher_prefix_ratio']:.3f} ± {e['teacher_prefix_ratio_se']:.3f}) | {e['chained']:.3f} "
                     f"({e['chained_ratio']:.3f} ± {e['chained_ratio_se']:.3f}) |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks prefix-source", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="demo", help="model directory or bundled name")
    p.add_argument("--excerpt", default="strings", help="a shipped excerpt")
    p.add_argument("--level", type=int, default=0, help="the upsampler level whose student is examined")
    p.add_argument("--batch", type=int, default=2, help="samples (each its own seed)")
    p.add_argument("--seconds", type=float, default=None, help="the excerpt's first seconds (default: whole)")
    p.add_argument("--upper", choices=("sampled", "real"), default="sampled",
                   help="the codes above the level: sampled by 'ar' from the excerpt's top-level codes (the main "
                        "command's path) or the excerpt's own encoded codes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--name", default=None, help="results file stem (default: prefix-source-level<L>-cpu)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import fastjukebox
    from fastjukebox.demo.excerpts import get_excerpt
    try:
        excerpt = get_excerpt(args.excerpt)
        jb = fastjukebox.load(args.model)
        if args.level not in jb.upsampler_levels:
            raise ValueError(f"level {args.level} is not an upsampler level of {args.model!r}")
        jb.student(args.level)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    r = measure(jb, excerpt, args.level, args.batch, args.seed, args.seconds, args.upper)
    summary = summarise(r["windows"])
    meta = dict(date=datetime.date.today().isoformat(), machine=platform.processor() or platform.machine(),
                torch=torch.__version__, excerpt=args.excerpt, level=args.level, batch=args.batch, seed=args.seed, upper=args.upper,
                command="OMP_NUM_THREADS=1 python -m benchmarks prefix-source " + " ".join(argv or []))
    md = render(summary, meta)
    print(md)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"prefix-source-level{args.level}-{args.upper}-cpu"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summary, **r}, indent=1))
    (out / f"{stem}.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
