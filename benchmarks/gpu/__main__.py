"""All GPU work in one command: kernel correctness, the CUDA-graph decode check, then the timings.

    python -m benchmarks.gpu                      # everything, in order of value, within --budget-s
    python -m benchmarks.gpu --resume             # continue an interrupted run
    python -m benchmarks.gpu --dry-run            # CPU, Triton interpreter, toy sizes: code path only

Stages, most valuable first (each writes its own JSON + markdown, named with the device, under
``--out-dir``; this command writes ``gpu-<device>.json`` / ``.md`` with the status of each):

1. ``kernel_check``: every Triton kernel against its PyTorch reference, bf16 / fp16 / fp32;
2. ``fast_path_check``: the captured CUDA-graph decode step against the same step run eagerly and
   against the bf16 reference path;
3. ``decode_speed``: AR decode tokens/s at batch 1 and 16 against the HBM roofline;
4. ``attention_speed``: factored attention forward and forward + backward against FlexAttention,
   dense masked SDPA and xformers at the upsampler's shapes (``triton.testing.do_bench``; every
   case first compiled untimed in parallel child processes, then timed alone).

Each stage runs in its own process and is stopped when the budget is spent; the stages rewrite
their result files after every case, so a stopped stage keeps what it measured and ``--resume``
runs only what is missing. A stage is not started when the budget left is shorter than the
projected time to its first result (``STAGES``).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common as gb

# Child processes that compile side by side in the stages that take --workers / --warm-workers:
# half the host's cores (a GPU host has 16 or more), at most 8.
WORKERS = str(max(1, min(8, (os.cpu_count() or 2) // 2)))

# (stage, module, arguments of a full run, arguments of a dry run, seconds to its first result on
# an H100-class machine: a projection, Triton compile at 1.41 CPU s per variant as measured by
# kernels.compile_check, plus model set-up). A stage is started only when that much time is left.
# The full run times attention at the upsampler's shapes (where sampling spends its time); the
# priors' shapes: python -m benchmarks.gpu.attention_speed --models prior_1b_lyrics prior_5b.
STAGES = (
    ("kernel_check", "benchmarks.gpu.kernel_check", ["--workers", WORKERS], ["--workers", "2"], 30),
    ("fast_path_check", "benchmarks.gpu.fast_path_check", [], [], 60),
    ("decode_speed", "benchmarks.gpu.decode_speed", [], ["--models", "prior_1b_lyrics", "--batches", "2"], 90),
    ("attention_speed", "benchmarks.gpu.attention_speed", ["--models", "upsampler_level_0", "--warm-workers", WORKERS],
     ["--patterns", "prev_block", "dense", "--warm-workers", "2"], 60),
)
DEFAULT_BUDGET_S = 480.0
MARGIN_S = 15            # kept free at the end of the budget for writing the summary


def _stage_command(module: str, extra: list[str], out_dir: Path, device: str, dry: bool, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", module, *extra]
    if module.endswith("fast_path_check"):
        cmd += ["--out", str(out_dir / f"fast-path-check-{device}.json")]
    else:
        cmd += ["--out-dir", str(out_dir)]
        if resume:
            cmd.append("--resume")
    if dry:
        cmd.append("--dry-run")
    return cmd


def render(doc: dict) -> str:
    lines = [f"# GPU run on {doc['device']}", "", doc.get("note", ""), "",
             f"Budget {doc['budget_s']:.0f} s, used {doc['wall_s']:.0f} s.", "",
             "| stage | status | wall s | exit | results |", "|---|---|---:|---:|---|"]
    for s in doc["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {s['wall_s']:.0f} | {s.get('exit', '')} | "
                     f"{s.get('results', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, Triton interpreter: code path only")
    p.add_argument("--out-dir", type=Path, default=None,
                   help=f"where results go (default {gb.RESULTS}; a new temporary folder for --dry-run)")
    p.add_argument("--resume", action="store_true", help="skip finished stages, resume the others")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"stop cleanly before this many seconds (default {DEFAULT_BUDGET_S:.0f}; a dry run: no limit)")
    p.add_argument("--stages", nargs="+", default=[s[0] for s in STAGES], choices=[s[0] for s in STAGES])
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 86400.0 if args.dry_run else DEFAULT_BUDGET_S
    if args.budget_s <= MARGIN_S:
        raise SystemExit(f"--budget-s must exceed {MARGIN_S} s, got {args.budget_s}")
    gb.start("benchmarks.gpu", args.dry_run)
    dry = args.dry_run
    device = gb.device_label(dry)
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="gpu-dry-run-")) if dry else gb.RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / f"gpu-{device}.json"
    done = set()
    if args.resume and summary_path.exists():
        done = {s["stage"] for s in json.loads(summary_path.read_text())["stages"] if s["status"] == "done"}
    doc = {"device": device, "dry_run": dry, "budget_s": args.budget_s, "wall_s": 0.0, "stages": []}
    if dry:
        doc["note"] = gb.DRY_RUN_NOTE
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # each stage sets its own mode
    t0 = time.perf_counter()
    failed = False
    for stage, module, full_args, dry_args, first_result_s in STAGES:
        if stage not in args.stages:
            continue
        entry = {"stage": stage, "wall_s": 0.0}
        left = args.budget_s - MARGIN_S - (time.perf_counter() - t0)
        if stage in done:
            entry["status"] = "done"
        elif not dry and first_result_s > left:
            entry["status"] = f"skipped: {left:.0f} s left, {first_result_s} s to a first result"
        else:
            cmd = _stage_command(module, dry_args if dry else full_args, out_dir, device, dry, args.resume)
            print(f"[benchmarks.gpu] {stage}: {' '.join(cmd[1:])} ({left:.0f} s left)", flush=True)
            s0 = time.perf_counter()
            # its own process group, so a stop at the budget also ends the stage's worker processes
            proc = subprocess.Popen(cmd, env=env, start_new_session=True)
            try:
                code = proc.wait(timeout=max(left, 1))
                entry.update(status="done" if code == 0 else "failed", exit=code)
                failed |= code != 0
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                entry["status"] = "stopped at the budget (partial results kept; --resume continues)"
            entry["wall_s"] = time.perf_counter() - s0
        found = sorted(f.name for f in out_dir.glob(f"{stage.replace('_', '-')}-{device}.*"))
        entry["results"] = ", ".join(found)
        doc["stages"].append(entry)
        doc["wall_s"] = time.perf_counter() - t0
        summary_path.write_text(json.dumps(doc, indent=1) + "\n")
        summary_path.with_suffix(".md").write_text(render(doc))
    print(render(doc))
    print(f"wrote {summary_path} and {summary_path.with_suffix('.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
