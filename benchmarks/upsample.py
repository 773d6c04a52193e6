"""The main command's path, end to end, per sampler: what a user of ``upsample`` gets.

    python -m benchmarks upsample                     # the strings excerpt, batch 1 and 16, every sampler
    python -m benchmarks upsample --excerpts all --batch 1
    python -m benchmarks upsample --quick             # 3 s of the excerpt, batch 1, ar and parallel (a smoke run)
    python -m benchmarks upsample --batch 16 --samplers ar speculative speculative@disable_at_batch=99

A sampler entry is ``--sampler``'s value, optionally followed by ``@OPTION=INT`` (the sampler
option ``OPTION``: ``speculative@disable_at_batch=99`` speculates at every batch size below 99).

Each run is ``fastjukebox upsample --from-audio demo:<excerpt> --sampler S --seed SEED`` through
the API (``demo.excerpts.upsample_excerpt``: the excerpt encoded to top-level codes, levels 1
and 0 sampled with its labels, every sample from its own seed), ``batch`` samples of the same
top-level codes. Per run: the wall time of each level's sampling (``SampleResult.level_seconds``)
and the teacher's NLL of each level's codes (bits per code): every window the sampler walked,
teacher-forced under that level's autoregressive prior, scored at its new positions only, so
each code counts once (``level_teacher_nll``). Runs alternate the samplers within a round, so a
change of the machine's load hits all of them.

``"speculative"`` drafts with the level's drafter (``drafter_level_{L}/``) where the family has one,
else with its student; the rows of a batch move on by themselves (``WindowDecoder.score_rows``).

Level-1 NLLs of all samplers are comparable (the same top-level codes); a level-0 NLL is
compared with ``"ar"``'s directly only where the level-1 codes are ``"ar"``'s too (samplers
whose level 1 is ``"ar"``: same seeds, same codes), marked in the table.

Writes ``benchmarks/results/upsample-<device>.{json,md}`` (``--name`` to change it).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLERS = ("ar", "parallel", "speculative", "1=parallel,0=speculative", "1=ar,0=parallel")


def level_teacher_nll(prior, codes: torch.Tensor, upper: torch.Tensor | None, labels, hop: int) -> torch.Tensor:
    """Teacher NLL (bits) of every code of a sampled level, (N, T) float64: the level walked in
    the sampler's windows (``fastjukebox.sampling.level_windows`` with hop ``hop``), each window
    teacher-forced under ``prior`` with its upper-level codes and label rows, each code scored in
    the window that sampled it (its new positions only).

    codes: (N, T) the level's codes; upper: (N, T // cond_downsample) codes of the level above
    (None for the top level); labels: the level's ``Labels`` (None without labels)."""
    from distill.metrics import teacher_token_scores
    from fastjukebox.labels import window_labels
    from fastjukebox.sampling import level_windows
    c = prior.config
    N, T = codes.shape
    out = torch.full((N, T), float("nan"), dtype=torch.float64)
    for start, known, new in level_windows(T, c.n_ctx, hop, 0):
        end = min(start + c.n_ctx, T)
        up = None if upper is None else upper[:, start // c.cond_downsample:end // c.cond_downsample]
        y = None if labels is None else window_labels(labels, start, c.raw_to_tokens, c.sample_length)
        nll, _ = teacher_token_scores(prior, codes[:, start:end], up, y, start=known)
        out[:, start + known:end] = nll
    return out


def sampler_entry(entry: str) -> tuple[str, dict[str, int]]:
    """``"NAME[@OPTION=INT]"`` -> (``--sampler`` value, sampler options)."""
    sampler, at, option = entry.partition("@")
    if not at:
        return sampler, {}
    key, eq, value = option.partition("=")
    if not (key and eq and value.lstrip("-").isdigit()):
        raise ValueError(f"sampler entry {entry!r}: write NAME@OPTION=INTEGER")
    return sampler, {key: int(value)}


def run_one(jb, excerpt, sampler: str, batch: int, seed: int, seconds: float | None) -> dict:
    """One upsample of ``excerpt`` (``batch`` samples) with ``sampler`` (a ``sampler_entry``): times
    and NLLs."""
    from fastjukebox.cli_values import parse_sampler
    from fastjukebox.demo.excerpts import excerpt_agreement, upsample_excerpt
    from fastjukebox.sample_seeds import sample_seed
    name, options = sampler_entry(sampler)
    began = time.perf_counter()
    with torch.inference_mode():
        result = upsample_excerpt(jb, excerpt, seconds=seconds, n_samples=batch, sampler=parse_sampler(name),
                                  sampler_options=options, seed=seed,
                                  sample_seeds=[sample_seed(seed, i) for i in range(batch)], progress=False)
    wall = time.perf_counter() - began
    hop_fraction = result.settings["hop_fraction"]
    row = dict(excerpt=excerpt.name, sampler=sampler, batch=batch, wall_s=wall,
               sampling_s=sum(result.level_seconds.values()))
    for level in jb.upsampler_levels:
        prior = jb.prior(level)
        frac = hop_fraction[level] if isinstance(hop_fraction, dict) else hop_fraction
        nll = level_teacher_nll(prior, result.codes[level].cpu(), result.codes[level + 1].cpu(),
                                result.labels.get(level), int(frac * prior.config.n_ctx))
        row[f"level{level}_s"] = result.level_seconds[level]
        row[f"level{level}_nll"] = float(nll.mean())
        row[f"level{level}_codes"] = int(nll.numel())
    row["score_agreement"] = excerpt_agreement(result.audio[0].float().cpu().numpy(), excerpt)["own"]
    row["level1_as_ar"] = _level_sampler(name, 1) == "ar"
    return row


def _level_sampler(sampler: str, level: int) -> str:
    from fastjukebox.cli_values import parse_sampler
    arg = parse_sampler(sampler)
    return arg if isinstance(arg, str) else arg.get(level, "ar")


def summarise(rows: list[dict]) -> list[dict]:
    """Median over rounds per (excerpt, batch, sampler), with ratios to ``"ar"`` of the same
    excerpt and batch: speed-up of the summed sampling time, NLL ratios per level."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["excerpt"], r["batch"], r["sampler"]), []).append(r)
    out = []
    for (excerpt, batch, sampler), rs in groups.items():
        s = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
        s.update(excerpt=excerpt, batch=batch, sampler=sampler, rounds=len(rs), level1_as_ar=rs[0]["level1_as_ar"])
        out.append(s)
    for s in out:
        ar = next((a for a in out if a["sampler"] == "ar" and a["excerpt"] == s["excerpt"]
                   and a["batch"] == s["batch"]), None)
        if ar is None:
            continue
        s["speedup"] = ar["sampling_s"] / s["sampling_s"]
        for level in (1, 0):
            if f"level{level}_nll" in s:
                s[f"level{level}_nll_ratio"] = s[f"level{level}_nll"] / ar[f"level{level}_nll"]
    return out


def render(summary: list[dict], meta: dict) -> str:
    lines = ["# The main command end to end, per sampler", "",
             f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), device "
             f"{meta['device']}, model `{meta['model']}`, seed {meta['seed']}, {meta['rounds']} round(s) "
             f"(medians), excerpt length {meta['seconds'] or 'whole'}:", "",
             f"    {meta['command']}", "",
             "Sampling time is levels 1 + 0 (loading, encoding and decoding excluded); speed-up: `ar`'s "
             "sampling time over the row's, same excerpt and batch. NLL: the teacher's, bits per code, every "
             "window the sampler walked, new positions only; ratio to `ar`'s. Level-0 ratios marked * compare "
             "level-0 codes sampled on other level-1 codes than `ar`'s.", "",
             "| excerpt | batch | sampler | level 1 s | level 0 s | sampling s | speed-up | level-1 NLL (ratio) "
             "| level-0 NLL (ratio) | score agreement |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sorted(summary, key=lambda s: (s["excerpt"], s["batch"], SAMPLERS.index(s["sampler"])
                                            if s["sampler"] in SAMPLERS else 99)):
        def ratio(level):
            r = s.get(f"level{level}_nll_ratio")
            mark = "*" if level == 0 and not s["level1_as_ar"] else ""
            return f"{s[f'level{level}_nll']:.3f} ({r:.3f}{mark})" if r is not None else f"{s[f'level{level}_nll']:.3f}"
        speed = f"{s['speedup']:.2f}x" if "speedup" in s else "-"
        lines.append(f"| {s['excerpt']} | {s['batch']} | `{s['sampler']}` | {s['level1_s']:.1f} | {s['level0_s']:.1f} "
                     f"| {s['sampling_s']:.1f} | {speed} | {ratio(1)} | {ratio(0)} | {s['score_agreement']:.2f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from fastjukebox.cli_options import HelpFormatter
    p = argparse.ArgumentParser(prog="python -m benchmarks upsample", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="demo", help="model directory or bundled name")
    p.add_argument("--excerpts", nargs="+", default=["strings"], help="shipped excerpts, or 'all'")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="samples per upsample")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), help="sampler of each run (as --sampler)")
    p.add_argument("--seconds", type=float, default=None, help="the excerpts' first seconds (default: whole)")
    p.add_argument("--rounds", type=int, default=1, help="runs of every sampler (medians)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (each sample its own, from it)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--name", default=None, help="results file stem (default: upsample-<device>)")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where the results go")
    p.add_argument("--quick", action="store_true", help="3 s, batch 1, ar and parallel: a smoke run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import fastjukebox as fj
    from fastjukebox.cli_values import parse_sampler
    from fastjukebox.demo.excerpts import get_excerpt, read_manifest
    from fastjukebox.progress import progress_bar
    if args.quick:
        args.seconds, args.batch, args.samplers = args.seconds or 3.0, [1], ["ar", "parallel"]
    if min(args.batch) < 1 or args.rounds < 1 or (args.seconds is not None and not args.seconds > 0):
        print("error: --batch and --rounds must be >= 1, --seconds > 0", file=sys.stderr)
        return 2
    try:
        excerpts = read_manifest() if args.excerpts == ["all"] else [get_excerpt(e) for e in args.excerpts]
        jb = fj.load(args.model, device=args.device)
        for s in args.samplers:
            name, options = sampler_entry(s)
            jb.resolve_sampling(jb.upsampler_levels, {"sampler": parse_sampler(name), "sampler_options": options})
    except (ValueError, OSError, argparse.ArgumentTypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = [(e, b, s) for _ in range(args.rounds) for e in excerpts for b in args.batch for s in args.samplers]
    rows = []
    bar = progress_bar(len(runs), "upsample", "run")
    for e, b, s in runs:
        bar.set_postfix_str(f"{e.name} batch {b} {s}")
        rows.append(run_one(jb, e, s, b, args.seed, args.seconds))
        bar.update(1)
    bar.close()
    summary = summarise(rows)
    device = "cpu" if args.device == "cpu" else torch.cuda.get_device_name(args.device).lower().replace(" ", "-")
    from .sampling_speed import machine
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), machine=machine()["cpu"],
                load_average_at_end=[round(x, 2) for x in os.getloadavg()], torch=torch.__version__, threads=torch.get_num_threads(), device=device, model=args.model,
                seed=args.seed, rounds=args.rounds, seconds=args.seconds,
                command="OMP_NUM_THREADS=1 python -m benchmarks upsample " + " ".join(argv or []))
    name = args.name or f"upsample-{device}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(dict(meta=meta, runs=rows, summary=summary), indent=1))
    text = render(summary, meta)
    (args.out_dir / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
