"""CPU sampling speed: static-cache decoder vs full recompute vs growing cache, in one process.

    python -m benchmarks.sampling_speed            # full run, writes benchmarks/results/sampling-cpu.{md,json}
    python -m benchmarks.sampling_speed --quick    # < 1 min, writes sampling-cpu-quick.{md,json}
    python -m benchmarks.sampling_speed --profile  # also profiles ours and (b) (sampling-cpu-profile.txt)

For each batch size the three methods first sample one greedy window (``top_k=1``), which is the
warm-up and the equivalence check: the tokens must be identical, or the run stops. The greedy
time sets how many windows one measurement samples (enough for ``--target-seconds``). Then
``--repeats`` rounds are timed with ``time.perf_counter``, the methods taking turns inside each
round so that a change in the machine's load hits all of them; tokens/s is the median over the
rounds. Timed windows use the upsamplers' default ``temperature=0.99``, no top-k/top-p.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from .cases import CASES, DEFAULT_CASE, QUICK_CASE, SamplingCase, build_prior  # noqa: E402
from .methods import DEFAULT_KNOBS, LABELS, METHODS, make_runner, mismatches  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHORT = {"ours": "ours", "full_recompute": "(a) full recompute", "growing_cache": "(b) growing cache"}


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    u = platform.uname()
    return {
        "cpu": cpu or "unknown",
        "processor": platform.processor(),
        "uname": f"{u.system} {u.release} {u.machine}",
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def source_version() -> dict:
    """The library's git commit, and whether its files differ from it (absent outside git)."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastjukebox", "kernels"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git_commit": commit, "library_modified": bool(dirty)}


def _time(fn, windows: int):
    """Seconds to sample ``windows`` windows, and the last window's codes."""
    t0 = time.perf_counter()
    for _ in range(windows):
        codes = fn()
    return time.perf_counter() - t0, codes


def run(case: SamplingCase, repeats: int, target: float, log=print) -> dict:
    prior = build_prior(case)
    out = {"machine": machine(), "source": source_version(), "model": case.describe(), "dtype": "float32",
           "settings": {"repeats": repeats, "target_seconds_per_measurement": target,
                        "sampling": DEFAULT_KNOBS, "seed": case.seed, "statistic": "median"},
           "greedy_check": {}, "sampled_tokens_identical": {}, "results": [], "ratios": {}}
    runners, windows, times = {}, {}, {}
    for batch in case.batches:
        greedy = {}
        for m in METHODS:
            fn = make_runner(m, prior, case, batch, temperature=1.0, top_k=1)
            t0 = time.perf_counter()
            greedy[m] = fn()
            warm = time.perf_counter() - t0
            windows[m, batch] = max(1, math.ceil(target / warm))
            runners[m, batch] = make_runner(m, prior, case, batch)
            times[m, batch] = []
            log(f"  warm-up batch {batch:>2} {SHORT[m]:<20} {warm:7.2f} s/window "
                f"-> {windows[m, batch]} window(s) per measurement")
        bad = mismatches(greedy)
        out["greedy_check"][str(batch)] = {"identical": not any(bad.values()), "mismatched_tokens": bad}
        if any(bad.values()):
            raise SystemExit(f"greedy tokens differ at batch {batch}: {bad}")
        log(f"  greedy tokens identical at batch {batch} ({batch} x {case.n_new})")
    sampled = {}
    for r in range(repeats):
        for batch in case.batches:
            for m in METHODS:
                seconds, sampled[m, batch] = _time(runners[m, batch], windows[m, batch])
                times[m, batch].append(seconds)
        log(f"  round {r + 1}/{repeats} done")
    for batch in case.batches:
        bad = mismatches({m: sampled[m, batch] for m in METHODS})
        out["sampled_tokens_identical"][str(batch)] = {"identical": not any(bad.values()),
                                                       "mismatched_tokens": bad}
    tps = {}
    for batch in case.batches:
        for m in METHODS:
            tokens = windows[m, batch] * batch * case.n_new
            runs = [tokens / t for t in times[m, batch]]
            tps[m, batch] = statistics.median(runs)
            out["results"].append({
                "method": m, "description": LABELS[m], "batch": batch, "n_new": case.n_new,
                "windows_per_measurement": windows[m, batch], "tokens_per_measurement": tokens,
                "seconds_per_measurement": [round(t, 4) for t in times[m, batch]],
                "tokens_per_s_runs": [round(x, 1) for x in runs],
                "tokens_per_s": round(tps[m, batch], 1),
            })
        out["ratios"][str(batch)] = {
            "ours/full_recompute": round(tps["ours", batch] / tps["full_recompute", batch], 3),
            "ours/growing_cache": round(tps["ours", batch] / tps["growing_cache", batch], 3),
        }
    out["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out["date_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return out


def table(res: dict) -> str:
    rows = ["| batch | method | tokens/s | s / window | runs (tokens/s) |", "|---:|---|---:|---:|---|"]
    for r in res["results"]:
        per_window = statistics.median(r["seconds_per_measurement"]) / r["windows_per_measurement"]
        runs = ", ".join(f"{x:.0f}" for x in r["tokens_per_s_runs"])
        rows.append(f"| {r['batch']} | {SHORT[r['method']]} | {r['tokens_per_s']:.0f} | {per_window:.3f} | {runs} |")
    rows += ["", "| batch | ours / (a) full recompute | ours / (b) growing cache |", "|---:|---:|---:|"]
    for batch, q in res["ratios"].items():
        rows.append(f"| {batch} | {q['ours/full_recompute']:.2f}x | {q['ours/growing_cache']:.2f}x |")
    return "\n".join(rows)


def markdown(res: dict, quick: bool) -> str:
    m, c = res["machine"], res["model"]
    greedy = ", ".join(f"batch {b}: {'identical' if v['identical'] else v['mismatched_tokens']}"
                       for b, v in res["greedy_check"].items())
    sampled = ", ".join(f"batch {b}: {'identical' if v['identical'] else v['mismatched_tokens']}"
                        for b, v in res["sampled_tokens_identical"].items())
    src = res.get("source") or {}
    source = ""
    if src:
        source = f", library at commit `{src['git_commit'][:10]}`"
        if src["library_modified"]:
            source += " with uncommitted changes in `fastjukebox/` or `kernels/`"
    return f"""# Sampling speed on CPU{' (quick run)' if quick else ''}

`python -m benchmarks.sampling_speed{' --quick' if quick else ''}`, {res['date_utc']}{source}.

## Machine

- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs), `platform.processor()`: `{m['processor'] or '(empty)'}`
- `uname`: {m['uname']}; Python {m['python']}; torch {m['torch']}
- threads: `torch.get_num_threads()` = {m['torch_threads']}, `OMP_NUM_THREADS` = {m['OMP_NUM_THREADS']}
- load average (1, 5, 15 min) at start {m['load_average_at_start']}, at end {m['load_average_at_end']}

## Model and workload

Prior `{c['case']}` with random weights, {res['dtype']}: level {c['level']} upsampler shape, n_ctx {c['n_ctx']},
width {c['width']}, depth {c['depth']} (attn_order {c['attn_order']}: block / transpose / previous-block),
heads {c['heads']}, n_state {c['n_state']}, blocks {c['blocks']} (block length {c['block_len']}), l_bins {c['l_bins']},
conditioner width {c['cond_width']} x depth {c['cond_depth']}.
Each window samples {c['n_new']} new tokens per sample from an empty window (no priming), conditioning
computed inside the window, `temperature=0.99`; batches {', '.join(map(str, c['batches']))}.

- **ours**: `fastjukebox.sampling.sample_window` with one reused `WindowDecoder` (static cache)
- **(a) full recompute**: teacher-forced `prior.prior(tokens[:, :t + 1], x_cond, start)` per token, last logits
- **(b) growing cache**: `benchmarks.baselines.GrowingCacheSampler`, per-layer caches grown by `torch.cat`
  and re-sliced per step as the original sampler does, weights re-cast on every call

Greedy (`top_k=1`) tokens of the three methods: {greedy}.
Timed (temperature 0.99, same generator seed) tokens: {sampled}.

## Results

Median of {res['settings']['repeats']} measurements (`time.perf_counter`) after a warm-up, methods interleaved
within each round; one measurement samples enough windows to take about
{res['settings']['target_seconds_per_measurement']} s. Tokens/s counts every sample of the batch.

{table(res)}

`python -m benchmarks.sampling_speed --profile` adds `sampling-cpu-profile.txt`: cProfile and
torch.profiler tables of one window of ours and (b) at each batch size.
"""


def profile(case: SamplingCase, path: Path, log=print) -> None:
    """cProfile (Python level) and torch.profiler (operator level) of one window of ours and (b)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile as tprofile

    prior = build_prior(case)
    parts = [f"Profiles of one window ({case.n_new} tokens) of `{case.name}`, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s).\n"]
    for batch in case.batches:
        for m in ("ours", "growing_cache"):
            fn = make_runner(m, prior, case, batch)
            fn()
            wall = _time(fn, 1)[0]
            pr = cProfile.Profile()
            pr.enable()
            fn()
            pr.disable()
            s = io.StringIO()
            st = pstats.Stats(pr, stream=s)
            st.sort_stats("tottime").print_stats(18)
            with tprofile(activities=[ProfilerActivity.CPU]) as p:
                fn()
            ops = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
            ops = "\n".join(ln for ln in ops.splitlines() if ln.strip())
            text = s.getvalue()
            text = text[text.index("ncalls"):] if "ncalls" in text else text
            parts.append(f"\n{'=' * 100}\n{SHORT[m]}, batch {batch}: {wall:.3f} s/window unprofiled, "
                         f"{st.total_calls} Python calls, {st.total_tt:.3f} s under cProfile\n{'=' * 100}\n"
                         f"-- cProfile, by own time --\n{text.rstrip()}\n\n-- torch.profiler, by self CPU --\n{ops}\n")
            log(f"  profiled {SHORT[m]} at batch {batch}")
    path.write_text("".join(parts), encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sampling_speed", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"the {QUICK_CASE!r} case, shorter measurements (< 1 min)")
    ap.add_argument("--case", choices=sorted(CASES), help="shape from benchmarks.cases")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-seconds", type=float, help="length of one measurement (default 2, quick 0.4)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--profile", action="store_true", help="also profile ours and (b), one window each")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    case = CASES[args.case or (QUICK_CASE if args.quick else DEFAULT_CASE)]
    target = args.target_seconds or (0.4 if args.quick else 2.0)
    print(f"case {case.name}: {case.n_new} new tokens, batches {case.batches}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    t0 = time.perf_counter()
    res = run(case, args.repeats, target)
    res["settings"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print()
    print(table(res))
    print(f"\n(total {res['settings']['wall_seconds']} s)")
    if not args.no_write:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stem = "sampling-cpu-quick" if args.quick else "sampling-cpu"
        (args.out_dir / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        (args.out_dir / f"{stem}.md").write_text(markdown(res, args.quick), encoding="utf-8")
        print(f"wrote {args.out_dir / stem}.md and .json")
    if args.profile:
        path = args.out_dir / "sampling-cpu-profile.txt"
        profile(case, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
