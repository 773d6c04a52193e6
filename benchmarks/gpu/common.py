"""Plumbing shared by the GPU benchmarks (``benchmarks.gpu``: attention_speed, decode_speed, kernel_check).

* ``start(dry_run)``: refuses to run without CUDA (exit code ``NO_CUDA_EXIT``) unless this is a
  dry run; a dry run sets ``TRITON_INTERPRET=1`` first, so Triton (imported later, by the kernels
  or by FlexAttention) runs its CPU interpreter.
* ``median_ms``: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run, median)
  on a GPU; a short ``perf_counter`` median in a dry run, whose numbers mean nothing.
* ``shard`` / ``run_workers``: a stage's cases cut into ``--shard I/N`` slices run by ``N`` child
  processes at once (Triton and Inductor compile on the CPU, one core per process; the GPU has 16
  cores beside it), their rows merged by the parent;
* ``ResultsFile``: rows kept in ``<name>-<device>.json`` with a markdown table beside it, both
  rewritten atomically after every row, so an interrupted run resumes (``--resume``) where it
  stopped.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

__all__ = ["add_worker_args", "shard", "run_workers", "NO_CUDA_EXIT", "TOL", "RESULTS", "DRY_RUN_NOTE", "start", "device_label", "sanitize", "gpu_info",
           "median_ms", "sync", "rel_rms", "ResultsFile", "add_common_args", "run_info", "fmt", "md_table"]

NO_CUDA_EXIT = 2
# Relative RMS error allowed against the fp32 reference on upcast inputs, per input dtype: about
# 8 and 4 ulps of bf16 / fp16 over a softmax of a few thousand keys; fp32 dots run as tf32x3.
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
RESULTS = Path(__file__).resolve().parent.parent / "results"
DRY_RUN_NOTE = ("DRY RUN on the CPU at toy sizes (Triton interpreter, fp32): exercises the code path only. "
                "These numbers are NOT measurements of kernel or decoding speed.")


def add_common_args(p) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, toy sizes, Triton interpreter: check the code path, measure nothing")
    p.add_argument("--out-dir", type=Path, default=None,
                   help=f"where the .json/.md go (default {RESULTS}; a new temporary folder for --dry-run)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in the output JSON, run the rest")
    p.add_argument("--warmup-ms", type=float, default=50.0, help="do_bench warm-up time per measurement")
    p.add_argument("--rep-ms", type=float, default=300.0, help="do_bench repetition time per measurement")


def add_worker_args(p, what: str) -> None:
    p.add_argument("--workers", type=int, default=1,
                   help=f"child processes that {what} at once, one slice of the cases each (default 1: none)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only every N-th case from the I-th (0-based); set by --workers for its children")


def shard(cases: list, spec: str | None) -> list:
    """The ``I/N`` slice of ``cases`` (every ``N``-th from the ``I``-th); all of them for ``None``."""
    if spec is None:
        return list(cases)
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise SystemExit(f"--shard must be I/N with integers, got {spec!r}") from None
    if not 0 <= i < n:
        raise SystemExit(f"--shard {spec}: need 0 <= I < N")
    return list(cases)[i::n]


_PARENT_ONLY = {"--workers": 1, "--warm-workers": 1, "--out-dir": 1, "--shard": 1, "--resume": 0}


def run_workers(module: str, argv: list[str], n: int, out_root: Path, extra: tuple[str, ...] = ()) -> list[dict]:
    """Run ``python -m module`` ``n`` times at once with this command's arguments (less the
    parent-only ones) plus ``--shard i/n --out-dir out_root/i`` and ``extra``; return the result
    documents (JSON) they wrote, whatever their exit status (failed cases are rows too)."""
    import subprocess
    args, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in _PARENT_ONLY:
            skip = _PARENT_ONLY[name] if "=" not in a else 0
            continue
        args.append(a)
    procs = []
    for i in range(n):
        d = Path(out_root) / str(i)
        d.mkdir(parents=True, exist_ok=True)
        procs.append((d, subprocess.Popen([sys.executable, "-m", module, *args, *extra, "--shard", f"{i}/{n}",
                                           "--out-dir", str(d)])))
    docs = []
    try:
        for d, proc in procs:
            proc.wait()
            docs += [json.loads(f.read_text(encoding="utf-8")) for f in sorted(d.glob("*.json"))]
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
    return docs


def start(command: str, dry_run: bool) -> None:
    """Check that this run can go ahead; must come before anything imports Triton."""
    if dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit(f"{command} --dry-run: Triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
        return
    if not torch.cuda.is_available():
        print(f"{command}: no CUDA device is available; these benchmarks time GPU kernels and refuse to run "
              "on the CPU. Run them on a machine with an NVIDIA GPU, or add --dry-run to check the code path "
              "at toy sizes on the CPU (no measurement).", file=sys.stderr)
        raise SystemExit(NO_CUDA_EXIT)


def sanitize(name: str) -> str:
    """A device name as a file-name part: lower case, runs of other characters -> ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def device_label(dry_run: bool) -> str:
    return "cpu-dry-run" if dry_run else sanitize(torch.cuda.get_device_name())


def gpu_info() -> dict:
    if not torch.cuda.is_available():
        return {}
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2 ** 30, 2), "l2_bytes": getattr(p, "L2_cache_size", None),
            "cuda": torch.version.cuda}


def run_info() -> dict:
    """Machine, library version and GPU of this run (imports the library: call after ``start``)."""
    from ..sampling_speed import machine, source_version
    import triton
    return {"machine": machine(), "source": source_version(), "gpu": gpu_info(), "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], *, dry_run: bool, warmup_ms: float, rep_ms: float,
              grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median milliseconds of ``fn()``: ``do_bench`` on a GPU; in a dry run two timed calls (the
    caller has already run ``fn``'s work once), enough to exercise the path."""
    if not dry_run:
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))
    times = []
    for _ in range(2):
        for x in grad_to_none or ():
            x.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64; NaN anywhere gives NaN (never a pass)."""
    got, ref = got.double(), ref.double()
    if got.shape != ref.shape:
        raise ValueError(f"shape {tuple(got.shape)} != {tuple(ref.shape)}")
    den = ref.norm().item()
    num = (got - ref).norm().item()
    if not torch.isfinite(got).all():
        return float("nan")
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


class ResultsFile:
    """``<out_dir>/<name>-<device>.json`` (``{"device", ..., "rows": [...]}``) and its ``.md``.

    ``key(row)`` identifies a row for ``--resume``; ``render(doc)`` makes the markdown."""

    def __init__(self, name: str, device: str, out_dir: Path | None, dry_run: bool, header: dict,
                 key: Callable[[dict], tuple], render: Callable[[dict], str], resume: bool = False):
        if out_dir is None:
            out_dir = Path(tempfile.mkdtemp(prefix=f"{name}-dry-run-")) if dry_run else RESULTS
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out_dir / f"{name}-{device}.json"
        self.md_path = self.json_path.with_suffix(".md")
        self.key, self.render = key, render
        self.doc = {"device": device, "dry_run": dry_run, **header, "rows": []}
        if dry_run:
            self.doc["note"] = DRY_RUN_NOTE
        if resume and self.json_path.exists():
            old = json.loads(self.json_path.read_text(encoding="utf-8"))
            if old.get("device") != device or bool(old.get("dry_run")) != dry_run:
                raise SystemExit(f"--resume: {self.json_path} holds results of another device or mode")
            self.doc["rows"] = list(old.get("rows", []))
        self._done = {self.key(r) for r in self.doc["rows"]}

    def done(self, row_key: tuple) -> bool:
        return row_key in self._done

    def add(self, row: dict) -> None:
        k = self.key(row)
        self.doc["rows"] = [r for r in self.doc["rows"] if self.key(r) != k] + [row]
        self._done.add(k)
        self.write()

    def write(self) -> None:
        from fastjukebox.atomic import atomic_path
        with atomic_path(self.json_path) as tmp:
            tmp.write_text(json.dumps(self.doc, indent=1) + "\n", encoding="utf-8")
        with atomic_path(self.md_path) as tmp:
            tmp.write_text(self.render(self.doc), encoding="utf-8")


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def md_table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def finish(results: "ResultsFile", render: Callable[[dict], str], dry: bool, failed: list, what: str) -> int:
    """Write and print the results file; exit status 1 (with ``what``) when cases failed."""
    results.write()
    print(render(results.doc))
    print(f"wrote {results.json_path} and {results.md_path}")
    if dry:
        print(DRY_RUN_NOTE)
    if failed:
        print(f"{what} in {len(failed)} case(s): {failed}", file=sys.stderr)
        return 1
    return 0
