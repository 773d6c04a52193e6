"""Factored attention kernels against FlexAttention, dense masked SDPA and xformers, on one GPU.

    python -m benchmarks.gpu.attention_speed                                  # all models, patterns, modes
    python -m benchmarks.gpu.attention_speed --models prior_5b --modes fwd_bwd --resume
    python -m benchmarks.gpu.attention_speed --dry-run --out-dir /tmp/k       # CPU, toy sizes: code path only

Shapes come from the released presets (``fastjukebox.config.PRESETS``): each model's head dim
(``width * m_attn / heads``: 480 for the upsamplers, 256 for 1b_lyrics, 150 for 5b), head count,
block length and window length (``seq_len``: 8192, or 6528 = 384 lyric + 6144 music tokens for
1b_lyrics), bf16, batch ``max(1, 4 // heads)`` so every case runs about four (batch, head) rows.
Patterns: block, transpose, dense (causal and bidirectional) and prev_block (which has no causal
variant). Modes: forward, and forward + backward.

Implementations, each first checked against ``factored_attention_reference`` run in fp32 on
upcast inputs (relative RMS error of the output, and in ``fwd_bwd`` of dq, dk, dv, under ``TOL``):

* ``ours``: ``kernels.factored_attention.ops.factored_attention`` on ``[B, T, H, D]``; timed twice
  (first and last) so the table shows the run-to-run spread.
* ``flex``: ``torch.compile(flex_attention)`` with a ``create_block_mask`` mask_mod per pattern,
  head dim zero-padded to a power of two.
* ``sdpa_dense``: ``F.scaled_dot_product_attention`` with the pattern's ``[T, T]`` boolean mask
  (``is_causal`` / no mask for the dense pattern, letting PyTorch choose its fastest backend).
* ``xformers``: ``memory_efficient_attention`` with an additive bias, head dim padded to a power
  of two when that is <= 256; ``n/a`` otherwise or when xformers is not installed.

Baselines get their inputs already in their own layout (``[B, H, T, D]`` / padded): the layout
change is not timed. Times are ``triton.testing.do_bench`` medians (CUDA events, L2 flushed
before each run). A failed check is recorded in the row and marked in the table; the command
exits 1 when one of ours fails. Targets (fwd+bwd): >= 1.5x FlexAttention, >= 5x dense SDPA.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import common as gb

MODELS = ("upsampler_level_0", "prior_1b_lyrics", "prior_5b")
PATTERN_CASES = (("block", True), ("block", False), ("transpose", True), ("transpose", False),
                 ("prev_block", False), ("dense", True), ("dense", False))
MODES = ("fwd", "fwd_bwd")
IMPLS = ("ours", "flex", "sdpa_dense", "xformers")
TARGETS = {"flex": 1.5, "sdpa_dense": 5.0}          # fwd+bwd speed-ups over these baselines
TOL = gb.TOL
XFORMERS_MAX_D = 256


@dataclass(frozen=True)
class Shape:
    """One attention problem: ``[batch, n_ctx, heads, head_dim]`` with blocks of ``block_len``."""

    model: str
    batch: int
    heads: int
    head_dim: int
    n_ctx: int
    block_len: int


# Dry-run shapes: a head dim that is not a power of two, a block length that is not one and does
# not divide the length (as 1b_lyrics' 102), several heads.
DRY_SHAPES = (Shape("toy_upsampler", 2, 1, 24, 40, 8), Shape("toy_1b_lyrics", 1, 2, 20, 30, 6))


def model_shapes(models, n_ctx: int | None = None, batch: int | None = None) -> list[Shape]:
    """Attention shapes of released presets (see the module docstring)."""
    from fastjukebox.config import PriorConfig, get_preset
    out = []
    for name in models:
        c = get_preset(name)
        if not isinstance(c, PriorConfig):
            raise ValueError(f"{name!r} is not a prior preset")
        T = n_ctx or c.seq_len
        out.append(Shape(name, batch or max(1, 4 // c.heads), c.heads, c.head_dim, T, c.block_len))
    return out


# --- masks ---------------------------------------------------------------------------------------
def allowed_mask(pattern: str, T: int, C: int, causal: bool, device) -> torch.Tensor:
    """``[T, T]`` bool: may query ``i`` (row) read key ``j`` (column)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    if pattern == "dense":
        m = torch.ones(T, T, dtype=torch.bool, device=device)
    elif pattern == "block":
        m = i // C == j // C
    elif pattern == "transpose":
        m = i % C == j % C
    elif pattern == "prev_block":
        return j // C == i // C - 1
    else:
        raise ValueError(f"no benchmark mask for pattern {pattern!r}")
    return m & (j <= i) if causal else m


def mask_mod(pattern: str, C: int, causal: bool) -> Callable | None:
    """FlexAttention ``mask_mod`` of a pattern; ``None`` for bidirectional dense (no mask)."""
    if pattern == "dense":
        return (lambda b, h, q, kv: kv <= q) if causal else None
    if pattern == "prev_block":
        return lambda b, h, q, kv: kv // C == q // C - 1
    same = {"block": lambda q, kv: q // C == kv // C, "transpose": lambda q, kv: q % C == kv % C}[pattern]
    if causal:
        return lambda b, h, q, kv: same(q, kv) & (kv <= q)
    return lambda b, h, q, kv: same(q, kv)


# --- implementations -----------------------------------------------------------------------------
@dataclass
class Impl:
    """``call`` takes q, k, v in the implementation's layout (``layout`` of ``[B, T, H, D]``) and
    returns its output; ``unlayout`` maps outputs and gradients back to ``[B, T, H, D]``."""

    call: Callable
    layout: Callable
    unlayout: Callable


def _padded(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def make_impls(shape: Shape, pattern: str, causal: bool, device, dtype, compile_flex: bool) -> dict:
    """Name -> ``Impl``, or -> a string saying why that implementation does not run here."""
    B, T, H, D, C = shape.batch, shape.n_ctx, shape.heads, shape.head_dim, shape.block_len
    scale = 1.0 / math.sqrt(D)
    ident = lambda x: x.contiguous()                        # noqa: E731
    bhtd = lambda x: x.transpose(1, 2).contiguous()         # noqa: E731
    out: dict[str, Impl | str] = {}

    from kernels.factored_attention.ops import factored_attention
    out["ours"] = Impl(lambda q, k, v: factored_attention(q, k, v, pattern, block_len=C, causal=causal),
                       ident, lambda y: y)

    Dp = _padded(D)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        mod = mask_mod(pattern, C, causal)
        block_mask = None if mod is None else create_block_mask(mod, None, None, T, T, device=device)
        flex = torch.compile(flex_attention, dynamic=False) if compile_flex else flex_attention
        out["flex"] = Impl(lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale),
                           lambda x: F.pad(x.transpose(1, 2), (0, Dp - D)).contiguous(),
                           lambda y: y[..., :D].transpose(1, 2))
    except Exception as e:  # noqa: BLE001 - any failure is reported in the row
        out["flex"] = f"n/a ({type(e).__name__}: {e})"[:300]

    if pattern == "dense":
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)  # noqa: E731
    else:
        mask = allowed_mask(pattern, T, C, causal, device)
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # noqa: E731
    out["sdpa_dense"] = Impl(sdpa, bhtd, lambda y: y.transpose(1, 2))

    try:
        import xformers.ops as xops
    except ImportError:
        out["xformers"] = "n/a (xformers not installed)"
    else:
        if Dp > XFORMERS_MAX_D:
            out["xformers"] = f"n/a (head dim {D} pads to {Dp} > {XFORMERS_MAX_D})"
        else:
            if pattern == "dense":
                bias = xops.LowerTriangularMask() if causal else None
            else:   # additive bias; rows padded to a multiple of 8 keys for xformers' alignment rule
                full = torch.full((T, -(-T // 8) * 8), float("-inf"), dtype=dtype, device=device)
                full[:, :T].masked_fill_(allowed_mask(pattern, T, C, causal, device), 0.0)
                bias = full[:, :T].expand(B, H, T, T)
            out["xformers"] = Impl(
                lambda q, k, v: xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale),
                lambda x: F.pad(x, (0, Dp - D)).contiguous(), lambda y: y[..., :D])
    return out


def reference(q, k, v, do, pattern, C, causal, backward: bool, dtype) -> list[torch.Tensor]:
    """[o] or [o, dq, dk, dv] of the reference in ``dtype`` (fp32 on a GPU, fp64 in a dry run)."""
    from kernels.factored_attention.reference import factored_attention_reference
    leaves = [x.detach().to(dtype).requires_grad_(backward) for x in (q, k, v)]
    with torch.set_grad_enabled(backward):
        o = factored_attention_reference(*leaves, pattern, block_len=C, causal=causal)
        if not backward:
            return [o.detach()]
        o.backward(do.to(dtype))
    return [o.detach()] + [x.grad for x in leaves]


def check_and_time(impl: Impl, q, k, v, do, ref, mode: str, tol: float, timing: dict) -> dict:
    """Check one implementation against ``ref``, then time it; returns the row's entry for it."""
    backward = mode == "fwd_bwd"
    leaves = [impl.layout(x).detach().requires_grad_(backward) for x in (q, k, v)]
    d_o = impl.layout(do)
    with torch.set_grad_enabled(backward):
        o = impl.call(*leaves)
        got = [impl.unlayout(o).detach()]
        if backward:
            o.backward(d_o)
            got += [impl.unlayout(x.grad) for x in leaves]
    names = ["o", "dq", "dk", "dv"][:len(got)]
    errors = {n: gb.rel_rms(g, r) for n, g, r in zip(names, got, ref)}
    ok = all(e <= tol for e in errors.values())      # NaN compares False: never passes
    del o, got
    for x in leaves:
        x.grad = None

    if backward:
        def fn():
            impl.call(*leaves).backward(d_o)
    else:
        def fn():
            with torch.no_grad():
                impl.call(*leaves)
    ms = gb.median_ms(fn, grad_to_none=leaves if backward else None, **timing)
    return {"ms": ms, "check": {"ok": ok, "rel_rms": errors, "tol": tol}, "fn": fn}


def useful_flops(mask_pairs: int, shape: Shape, mode: str) -> float:
    """Matmul FLOPs of the visible (query, key) pairs: 2 products forward, 5 more backward."""
    fwd = 4.0 * shape.batch * shape.heads * shape.head_dim * mask_pairs
    return fwd * (3.5 if mode == "fwd_bwd" else 1.0)


def run_case(shape: Shape, pattern: str, causal: bool, mode: str, *, device, dtype, compile_flex: bool,
             timing: dict, seed: int) -> dict:
    B, T, H, D, C = shape.batch, shape.n_ctx, shape.heads, shape.head_dim, shape.block_len
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, H, D, generator=g, device=device, dtype=dtype) for _ in range(4))
    ref_dtype = torch.float64 if device == "cpu" else torch.float32
    ref = reference(q, k, v, do, pattern, C, causal, mode == "fwd_bwd", ref_dtype)
    pairs = int(allowed_mask(pattern, T, C, causal, device).sum())
    impls = make_impls(shape, pattern, causal, device, dtype, compile_flex)
    row = {"op": "factored_attention", "model": shape.model, "pattern": pattern, "causal": causal,
           "head_dim": D, "heads": H, "n_ctx": T, "block_len": C, "batch": B, "mode": mode,
           "dtype": str(dtype).removeprefix("torch."), "ms": {}, "checks": {}, "errors": {}}
    ours_fn = None
    for name in IMPLS:
        impl = impls[name]
        if isinstance(impl, str):
            row["ms"][name] = None
            row["errors"][name] = impl
            continue
        try:
            res = check_and_time(impl, q, k, v, do, ref, mode, TOL[dtype], timing)
        except Exception as e:  # noqa: BLE001 - an implementation that fails is reported, not fatal
            row["ms"][name] = None
            row["errors"][name] = f"{type(e).__name__}: {e}"[:300]
            if device != "cpu":
                torch.cuda.empty_cache()
            continue
        row["ms"][name], row["checks"][name] = res["ms"], res["check"]
        if name == "ours":
            ours_fn = res["fn"]
    if ours_fn is not None:   # ours again, last: the spread between two timings of one version
        row["ours_repeat_ms"] = gb.median_ms(ours_fn, **timing)
        row["ours_tflops"] = useful_flops(pairs, shape, mode) / (row["ms"]["ours"] * 1e-3) / 1e12
    row["visible_pairs"] = pairs
    for name in ("flex", "sdpa_dense", "xformers"):
        if row["ms"].get(name) and row["ms"].get("ours"):
            row.setdefault("speedup", {})[name] = row["ms"][name] / row["ms"]["ours"]
    return row


# --- report --------------------------------------------------------------------------------------
def row_key(r: dict) -> tuple:
    return r["model"], r["pattern"], r["causal"], r["mode"], r["n_ctx"], r["batch"]


def render(doc: dict) -> str:
    lines = [f"# Factored attention kernels: {doc['device']}", ""]
    if doc.get("dry_run"):
        lines += [f"**{gb.DRY_RUN_NOTE}**", ""]
    lines += [f"Date {doc.get('date')}, torch {doc.get('machine', {}).get('torch')}, triton {doc.get('triton')}, "
              f"GPU {doc.get('gpu') or 'none'}. Times: median ms (`do_bench`). Speed-up = baseline ms / ours ms. "
              "Targets for fwd+bwd: >= 1.5x flex, >= 5x sdpa_dense. `*` = failed its check against the "
              "reference (see the JSON); n/a = did not run (reason in the JSON).", ""]
    for mode in MODES:
        rows = [r for r in doc["rows"] if r["mode"] == mode]
        if not rows:
            continue
        lines += [f"## {mode}", ""]
        body = []
        for r in rows:
            def ms(name):
                bad = name in r["checks"] and not r["checks"][name]["ok"]
                return gb.fmt(r["ms"].get(name)) + ("*" if bad else "")
            sp = r.get("speedup", {})
            met = ""
            if mode == "fwd_bwd" and sp:
                met = "yes" if all(sp.get(n, 0) >= t for n, t in TARGETS.items()) else "no"
            body.append([r["model"], r["head_dim"], r["heads"], r["batch"], r["n_ctx"], r["block_len"], r["pattern"],
                         "yes" if r["causal"] else "no", ms("ours"), gb.fmt(r.get("ours_repeat_ms")), ms("flex"),
                         ms("sdpa_dense"), ms("xformers"), gb.fmt(sp.get("flex")), gb.fmt(sp.get("sdpa_dense")),
                         gb.fmt(sp.get("xformers")), gb.fmt(r.get("ours_tflops")), met])
        lines.append(gb.md_table(
            ["model", "D", "H", "B", "T", "C", "pattern", "causal", "ours ms", "ours again", "flex ms", "sdpa ms",
             "xformers ms", "x flex", "x sdpa", "x xformers", "ours TFLOP/s", "targets met"], body))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.attention_speed", description=__doc__.split("\n\n")[0])
    gb.add_common_args(p)
    p.add_argument("--models", nargs="+", default=list(MODELS), help="presets whose attention shapes are timed")
    p.add_argument("--patterns", nargs="+", default=sorted({pt for pt, _ in PATTERN_CASES}),
                   choices=sorted({pt for pt, _ in PATTERN_CASES}))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--n-ctx", type=int, default=None, help="override every model's window length")
    p.add_argument("--batch", type=int, default=None, help="override the batch (default max(1, 4 // heads))")
    p.add_argument("--no-compile", action="store_true", help="FlexAttention without torch.compile (slow path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warm-workers", type=int, default=0,
                   help="first run the cases untimed in this many child processes at once, to fill the Triton "
                        "and Inductor caches (their compiles then load from disk in the timed run)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only every N-th case from the I-th (0-based); set by --warm-workers")
    args = p.parse_args(argv)
    gb.start("benchmarks.gpu.attention_speed", args.dry_run)

    dry = args.dry_run
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    shapes = list(DRY_SHAPES) if dry else model_shapes(args.models, args.n_ctx, args.batch)
    compile_flex = not (dry or args.no_compile)
    if compile_flex:   # every (pattern, shape, mode) compiles anew: keep dynamo from giving up
        from torch._dynamo import config as dynamo_config
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, 1024)
    header = {**gb.run_info(), "dtype": str(dtype).removeprefix("torch."), "flex_compiled": compile_flex,
              "timing": {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "statistic": "median"},
              "targets_fwd_bwd": TARGETS, "tolerance_rel_rms": TOL[dtype], "shapes": [asdict(s) for s in shapes]}
    results = gb.ResultsFile("attention-speed", gb.device_label(dry), args.out_dir, dry, header, row_key, render,
                             resume=args.resume)
    todo = [(s, pt, c, m) for s in shapes for pt, c in PATTERN_CASES if pt in args.patterns for m in args.modes]
    todo = [t for t in gb.shard(todo, args.shard)
            if not results.done((t[0].model, t[1], t[2], t[3], t[0].n_ctx, t[0].batch))]
    timing = dict(dry_run=dry, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    if args.warm_workers > 0 and todo:
        # compiles are the slow part on a fresh machine and run one core each: do them side by side
        # (untimed, results thrown away), then time every case alone with warm caches
        import tempfile
        with tempfile.TemporaryDirectory(prefix="attention-speed-warm-") as tmp:
            gb.run_workers("benchmarks.gpu.attention_speed", sys.argv[1:] if argv is None else argv,
                           args.warm_workers, Path(tmp), extra=("--warmup-ms", "1", "--rep-ms", "1"))

    from fastjukebox.progress import progress_bar
    failed = []
    with progress_bar(len(todo), "kernels", "case") as bar:
        for i, (shape, pattern, causal, mode) in enumerate(todo):
            bar.update(1)
            bar.set_postfix_str(f"{shape.model} {pattern}{' causal' if causal else ''} {mode}")
            row = run_case(shape, pattern, causal, mode, device=device, dtype=dtype, compile_flex=compile_flex,
                           timing=timing, seed=args.seed + i)
            results.add(row)
            if "ours" not in row["checks"] or not row["checks"]["ours"]["ok"]:
                failed.append(row_key(row))
    return gb.finish(results, render, dry, failed, 'ours failed its check (or did not run)')


if __name__ == "__main__":
    sys.exit(main())
