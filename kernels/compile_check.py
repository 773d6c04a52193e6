"""Compile every kernel variant ahead of time for sm_90 and sm_80 and check the limits, no GPU needed.

``python -m kernels.compile_check [--subset representative] [--arch 90 80] [--jobs N] [--out-dir DIR]``
(also ``python -m benchmarks compile-check``)

Each variant of ``kernels.variants`` goes through ``triton.compile`` for a ``GPUTarget`` down to
PTX and cubin; the shared memory comes from the compiled metadata, registers and spills from the
bundled ``ptxas -v`` log. A variant fails on a compile error, on shared memory above the target's
per-block limit, on any spill in a forward, decode or sampling kernel, and on spills above
``BACKWARD_SPILL_BUDGET`` bytes per thread in a backward kernel. Writes
``compile-check-triton-<version>[-<subset>].json`` and ``.md`` and exits 1 when anything fails.

Triton's cache is a fresh temporary directory for every run (a cached binary would hide its
``ptxas`` log and its compile time). ``TRITON_INTERPRET`` must not be set.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["CheckResult", "compile_variant", "failures_of", "SHARED_LIMIT", "BACKWARD_SPILL_BUDGET"]

# Largest dynamic shared memory one block may opt into, bytes (CUDA programming guide, compute
# capability tables: 227 KiB on 9.0, 163 KiB on 8.0).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
# Bytes of spills per thread allowed in the backward kernels (local memory that stays in L1).
# Seen in the full set after the tile choices: at most 80 B with triton 3.9, 64 B with 3.6.
BACKWARD_SPILL_BUDGET = 128

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


@dataclass
class CheckResult:
    variant: str
    kernel: str
    dtype: str
    arch: int
    num_warps: int
    num_stages: int
    constexprs: dict
    uses: list
    compile_s: float
    compile_cpu_s: float | None = None      # this process's and ptxas's CPU time: steadier on a shared machine
    shared_bytes: int | None = None
    registers: int | None = None
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    stack_bytes: int | None = None
    error: str | None = None
    failures: list | None = None


def _cpu_seconds() -> float:
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


def _fresh_cache() -> None:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastjukebox-compile-check-")


def compile_variant(variant, arch: int) -> CheckResult:
    """Compile one ``kernels.variants.Variant`` for ``sm_<arch>`` and read its resources."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .variants import KERNELS

    fn = KERNELS[variant.kernel]
    if type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("the kernels were built for Triton's interpreter: unset TRITON_INTERPRET to compile them")
    base = dict(variant=variant.describe(), kernel=variant.kernel, dtype=variant.dtype, arch=arch,
                num_warps=variant.num_warps, num_stages=variant.num_stages, constexprs=dict(variant.constexprs),
                uses=list(variant.uses))
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, variant.signature(), variant.constexprs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
    except Exception as e:           # noqa: BLE001 - any compiler failure is a finding, reported per variant
        res = CheckResult(**base, compile_s=time.perf_counter() - t0, compile_cpu_s=_cpu_seconds() - c0,
                          error=f"{type(e).__name__}: {e}"[:4000])
        res.failures = failures_of(res, variant.is_backward)
        return res
    text = log.getvalue()
    regs, spills, stack = _REGS.search(text), _SPILLS.search(text), _STACK.search(text)
    res = CheckResult(**base, compile_s=time.perf_counter() - t0, compile_cpu_s=_cpu_seconds() - c0,
                      shared_bytes=int(compiled.metadata.shared),
                      registers=int(regs.group(1)) if regs else None,
                      spill_store_bytes=int(spills.group(1)) if spills else None,
                      spill_load_bytes=int(spills.group(2)) if spills else None,
                      stack_bytes=int(stack.group(1)) if stack else None)
    if regs is None or spills is None:
        res.error = f"no register / spill counts in the ptxas log: {text[-1000:]!r}"
    res.failures = failures_of(res, variant.is_backward)
    return res


def failures_of(res: CheckResult, backward: bool, spills: bool = True) -> list[str]:
    """Why ``res`` fails the check (empty when it passes); ``spills=False`` checks compile errors
    and shared memory only."""
    if res.error:
        return [f"compile error: {res.error.splitlines()[0] if res.error else ''}"]
    out = []
    limit = SHARED_LIMIT[res.arch]
    if res.shared_bytes > limit:
        out.append(f"shared memory {res.shared_bytes} B > sm_{res.arch} limit {limit} B")
    spill = max(res.spill_store_bytes or 0, res.spill_load_bytes or 0)
    if not spills:
        return out
    if backward and spill > BACKWARD_SPILL_BUDGET:
        out.append(f"backward spills {spill} B/thread > budget {BACKWARD_SPILL_BUDGET} B")
    elif not backward and spill:
        out.append(f"spills {spill} B/thread in a kernel that must not spill")
    return out


def _worker_init() -> None:
    _fresh_cache()


def _compile_job(job):
    index, arch = job
    from .variants import released_variants
    return compile_variant(_VARIANTS_CACHE.setdefault(arch, released_variants(arch))[index], arch)


_VARIANTS_CACHE: dict = {}


def run_check(arches: list[int], subset: str, jobs: int, progress: bool = True) -> list[CheckResult]:
    from tqdm import tqdm

    from .variants import released_variants, representative_subset

    work = []
    for arch in arches:
        variants = released_variants(arch)
        chosen = representative_subset(variants) if subset == "representative" else variants
        keys = {v.key for v in chosen}
        work += [(i, arch) for i, v in enumerate(variants) if v.key in keys]
    _fresh_cache()
    bar = tqdm(total=len(work), desc="compiling", unit="variant", disable=not progress, file=sys.stderr)
    results = []
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init) as pool:
            for res in pool.map(_compile_job, work):
                results.append(res)
                bar.update()
    else:
        for job in work:
            results.append(_compile_job(job))
            bar.update()
    bar.close()
    return results


def _md_table(results: list[CheckResult], version: str, subset: str, wall_s: float) -> str:
    n_fail = sum(bool(r.failures) for r in results)
    lines = [f"# Ahead-of-time compile check (triton {version}, {subset} set)", "",
             f"{len(results)} compilations, {n_fail} failing; {wall_s:.0f} s wall, "
             f"{sum(r.compile_s for r in results):.0f} s of compile time summed over the variants "
             f"({sum(r.compile_cpu_s or 0 for r in results):.0f} CPU s). "
             "Limits: shared memory per block "
             f"{', '.join(f'sm_{a} {b // 1024} KiB' for a, b in SHARED_LIMIT.items())}; "
             f"no spills in forward, decode and sampling kernels; backward kernels at most "
             f"{BACKWARD_SPILL_BUDGET} B of spills per thread.", "",
             "| arch | kernel | dtype | constexprs | warps | stages | shared B | regs | spill st/ld B | compile s "
             "| CPU s | uses | result |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in sorted(results, key=lambda r: (-r.arch, r.kernel, r.dtype, r.variant)):
        c = ", ".join(f"{k}={v}" for k, v in r.constexprs.items() if k != "H")
        uses = "; ".join(r.uses[:3]) + (f"; +{len(r.uses) - 3}" if len(r.uses) > 3 else "")
        spill = "" if r.spill_store_bytes is None else f"{r.spill_store_bytes}/{r.spill_load_bytes}"
        verdict = "FAIL: " + "; ".join(r.failures) if r.failures else \
            "ok (spills reported, not checked)" if (r.spill_store_bytes or 0) > 0 else "ok"
        lines.append(f"| sm_{r.arch} | {r.kernel} | {r.dtype} | {c} | {r.num_warps} | {r.num_stages} | "
                     f"{r.shared_bytes if r.shared_bytes is not None else ''} | {r.registers or ''} | {spill} | "
                     f"{r.compile_s:.2f} | {r.compile_cpu_s or 0:.2f} | {uses} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT))
    ap.add_argument("--subset", choices=("all", "representative"), default="all",
                    help="representative: a greedy cover of every kernel's dtypes, patterns, head dims and "
                         "switches (the CI set)")
    ap.add_argument("--jobs", type=int, default=1, help="compiler processes")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--spills", choices=("fail", "report"), default="fail",
                    help="report: record spills in the table without failing on them")
    ap.add_argument("--expect-triton", metavar="VERSION", help="fail unless this triton version is the one imported")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("TRITON_INTERPRET is set: the compile check needs Triton's compiler, not its interpreter")
    import triton

    from .variants import BACKWARD_KERNELS

    if args.expect_triton and triton.__version__ != args.expect_triton:
        raise SystemExit(f"--expect-triton {args.expect_triton}: imported triton {triton.__version__} "
                         f"from {triton.__file__}")
    t0 = time.perf_counter()
    results = run_check(args.arch, args.subset, args.jobs, progress=not args.quiet)
    wall = time.perf_counter() - t0
    if args.spills == "report":
        for r in results:
            r.failures = failures_of(r, r.kernel in BACKWARD_KERNELS, spills=False)
    stem = f"compile-check-triton-{triton.__version__}" + ("" if args.subset == "all" else f"-{args.subset}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    doc = dict(triton=triton.__version__, subset=args.subset, arches=args.arch, wall_s=wall, spills=args.spills,
               shared_limit=SHARED_LIMIT, backward_spill_budget=BACKWARD_SPILL_BUDGET,
               results=[asdict(r) for r in results])
    (args.out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out_dir / f"{stem}.md").write_text(_md_table(results, triton.__version__, args.subset, wall))
    failing = [r for r in results if r.failures]
    for r in failing:
        print(f"FAIL sm_{r.arch} {r.variant}: {'; '.join(r.failures)}", file=sys.stderr)
    print(f"triton {triton.__version__}: {len(results)} compilations for "
          f"{', '.join(f'sm_{a}' for a in args.arch)} in {wall:.0f} s, {len(failing)} failing; "
          f"table in {args.out_dir / stem}.md")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
