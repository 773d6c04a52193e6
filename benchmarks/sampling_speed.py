"""CPU sampling speed: static-cache decoder vs the original-style loop and other baselines, in one process.

    python -m benchmarks.sampling_speed            # both cases (~11 min), writes benchmarks/results/sampling-cpu.{md,json}
    python -m benchmarks.sampling_speed --quick    # ~4 min, writes sampling-cpu-quick.{md,json}
    python -m benchmarks.sampling_speed --profile  # also profiles ours and (b) (sampling-cpu-profile.txt)

Cases (``benchmarks.cases``): an empty 1024-token window, and a level-0 window in steady state
(n_ctx 8192, the first half primed, the second half sampled, as the upsamplers hop). For each case and batch size every method first
samples one greedy window (``top_k=1``), the warm-up and the equivalence check (mismatching tokens
are reported). The greedy time sets how many windows one measurement samples (enough for
``--target-seconds``). Then ``--repeats`` rounds are timed with ``time.perf_counter``, the methods
taking turns inside each round so that a change in the machine's load hits all of them; tokens/s
is the median over the rounds. Only sampling is timed: each window's conditioning and priming of
known codes happen before the clock starts. Timed windows use the upsamplers' default
``temperature=0.99``, no top-k/top-p.
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

from fastjukebox.settings import DEFAULT_TEMPERATURE  # noqa: E402

from .cases import CASES, SamplingCase, build_prior  # noqa: E402
from .methods import DEFAULT_KNOBS, LABELS, SHORT, make_method, mismatches  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FULL_CASES = ("upsampler_small", "upsampler_8k_primed")
QUICK_CASES = ("upsampler_small_quick", "upsampler_8k_primed_quick")


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


def _time(prepare, windows: int):
    """Seconds spent sampling ``windows`` windows (set-up not counted), and the last window's codes."""
    total = 0.0
    for _ in range(windows):
        run = prepare()
        t0 = time.perf_counter()
        codes = run()
        total += time.perf_counter() - t0
    return total, codes


def run(case: SamplingCase, repeats: int, target: float, log=print) -> dict:
    prior = build_prior(case)
    methods = case.methods
    out = {"model": case.describe(), "dtype": "float32",
           "settings": {"repeats": repeats, "target_seconds_per_measurement": target,
                        "sampling": DEFAULT_KNOBS, "seed": case.seed, "statistic": "median"},
           "greedy_check": {}, "results": [], "ratios": {}}
    runners, windows, times = {}, {}, {}
    for batch in case.batches:
        greedy = {}
        for m in methods:
            seconds, greedy[m] = _time(make_method(m, prior, case, batch, temperature=1.0, top_k=1), 1)
            windows[m, batch] = max(1, math.ceil(target / seconds))
            runners[m, batch] = make_method(m, prior, case, batch)
            times[m, batch] = []
            log(f"  warm-up batch {batch:>2} {SHORT[m]:<20} {seconds:7.2f} s/window "
                f"-> {windows[m, batch]} window(s) per measurement")
        bad = mismatches(greedy)
        out["greedy_check"][str(batch)] = {"identical": not any(bad.values()), "mismatched_tokens": bad,
                                           "tokens": batch * case.n_new}
        log(f"  greedy tokens at batch {batch} ({batch} x {case.n_new}), mismatches vs ours: {bad}")
    for r in range(repeats):
        for batch in case.batches:
            for m in methods:
                times[m, batch].append(_time(runners[m, batch], windows[m, batch])[0])
        log(f"  round {r + 1}/{repeats} done")
    tps = {}
    for batch in case.batches:
        for m in methods:
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
        out["ratios"][str(batch)] = {f"ours/{m}": round(tps["ours", batch] / tps[m, batch], 3)
                                     for m in methods if m != "ours"}
    return out


def table(res: dict) -> str:
    rows = ["| batch | method | tokens/s | s / window | runs (tokens/s) |", "|---:|---|---:|---:|---|"]
    for r in res["results"]:
        per_window = statistics.median(r["seconds_per_measurement"]) / r["windows_per_measurement"]
        runs = ", ".join(f"{x:.0f}" for x in r["tokens_per_s_runs"])
        rows.append(f"| {r['batch']} | {SHORT[r['method']]} | {r['tokens_per_s']:.0f} | {per_window:.3f} | {runs} |")
    others = [m for m in res["model"]["methods"] if m != "ours"]
    rows += ["", "| batch | " + " | ".join(f"ours / {SHORT[m]}" for m in others) + " |",
             "|---:|" + "---:|" * len(others)]
    for batch, q in res["ratios"].items():
        rows.append(f"| {batch} | " + " | ".join(f"{q['ours/' + m]:.2f}x" for m in others) + " |")
    return "\n".join(rows)


def _case_markdown(res: dict) -> str:
    c = res["model"]
    greedy = ", ".join(f"batch {b}: " + ("identical" if v["identical"] else
                                          f"mismatching tokens {v['mismatched_tokens']} of {v['tokens']}")
                       for b, v in res["greedy_check"].items())
    window = (f"{c['known']} known codes primed (untimed), then {c['n_new']} new tokens per sample"
              if c["known"] else f"{c['n_new']} new tokens per sample from an empty window")
    return f"""## `{c['case']}`

Random weights, {res['dtype']}: level {c['level']} upsampler shape, n_ctx {c['n_ctx']}, width {c['width']},
depth {c['depth']} (attn_order {c['attn_order']}: block / transpose / previous-block), heads {c['heads']},
n_state {c['n_state']}, blocks {c['blocks']} (block length {c['block_len']}), l_bins {c['l_bins']},
conditioner width {c['cond_width']} x depth {c['cond_depth']}. Each window: {window};
`temperature={DEFAULT_TEMPERATURE}`; batches {', '.join(map(str, c['batches']))}.
Greedy (`top_k=1`) tokens vs ours: {greedy}.

{table(res)}
"""


def markdown(out: dict, quick: bool) -> str:
    m = out["machine"]
    src = out.get("source") or {}
    source = ""
    if src:
        source = f", library at commit `{src['git_commit'][:10]}`"
        if src["library_modified"]:
            source += " with uncommitted changes in `fastjukebox/` or `kernels/`"
    methods = "\n".join(f"- **{SHORT[k]}**: {LABELS[k]}" for k in LABELS)
    first = out["cases"][0]["settings"]
    cases = "\n".join(_case_markdown(r) for r in out["cases"])
    return f"""# Sampling speed on CPU{' (quick run)' if quick else ''}

`python -m benchmarks.sampling_speed{' --quick' if quick else ''}`, {out['date_utc']}{source}.

## Machine

- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs), `platform.processor()`: `{m['processor'] or '(empty)'}`
- `uname`: {m['uname']}; Python {m['python']}; torch {m['torch']}
- threads: `torch.get_num_threads()` = {m['torch_threads']}, `OMP_NUM_THREADS` = {m['OMP_NUM_THREADS']}
- load average (1, 5, 15 min) at start {m['load_average_at_start']}, at end {m['load_average_at_end']}

## Methods

{methods}

See `benchmarks/methods.py`, `benchmarks/original_style.py` and `benchmarks/baselines.py`.
Only sampling is timed (conditioning and priming of known codes happen before the clock starts).
Median of {first['repeats']} measurements (`time.perf_counter`) after a warm-up, methods interleaved
within each round; one measurement samples enough windows to take about
{first['target_seconds_per_measurement']} s. Tokens/s counts every sample of the batch.

{cases}
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
        for m in ("ours", "original_style"):
            prepare = make_method(m, prior, case, batch)
            wall = _time(prepare, 1)[0]
            pr = cProfile.Profile()
            run = prepare()
            pr.enable()
            run()
            pr.disable()
            s = io.StringIO()
            st = pstats.Stats(pr, stream=s)
            st.sort_stats("tottime").print_stats(18)
            run = prepare()
            with tprofile(activities=[ProfilerActivity.CPU]) as p:
                run()
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
    ap.add_argument("--quick", action="store_true", help=f"cases {', '.join(QUICK_CASES)}, shorter measurements")
    ap.add_argument("--case", choices=sorted(CASES), action="append", help="shape(s) from benchmarks.cases")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-seconds", type=float, help="length of one measurement (default 2, quick 0.4)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--profile", action="store_true", help="also profile ours and (b), one window each")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    names = args.case or (QUICK_CASES if args.quick else FULL_CASES)
    target = args.target_seconds or (0.4 if args.quick else 2.0)
    out = {"machine": machine(), "source": source_version(), "cases": []}
    t0 = time.perf_counter()
    for name in names:
        case = CASES[name]
        print(f"case {case.name}: {case.known} known + {case.n_new} new tokens, batches {case.batches}, "
              f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
        res = run(case, args.repeats, target)
        print()
        print(table(res))
        print()
        out["cases"].append(res)
    out["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out["date_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"(total {out['wall_seconds']} s)")
    if not args.no_write:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stem = "sampling-cpu-quick" if args.quick else "sampling-cpu"
        (args.out_dir / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        (args.out_dir / f"{stem}.md").write_text(markdown(out, args.quick), encoding="utf-8")
        print(f"wrote {args.out_dir / stem}.md and .json")
    if args.profile:
        path = args.out_dir / "sampling-cpu-profile.txt"
        profile(CASES[names[0]], path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
