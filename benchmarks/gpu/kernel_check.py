"""Correctness of every Triton kernel against its PyTorch reference on one GPU, per dtype.

    python -m benchmarks.gpu.kernel_check [--dry-run] [--out-dir DIR] [--resume]

* factored attention, forward and backward (``o``, ``dq``, ``dk``, ``dv``), every pattern of every
  released model at its head dim, head count and block length (window cut to ``--n-ctx``), causal
  where the pattern has it;
* cached decoding attention, every layout, a one-query step and a 16-query priming chunk, late in
  the window (key splits in use);
* fused sampling, temperature only, top-k and top-p, with the same Exp(1) noise as the reference.

Attention passes when the relative RMS error against ``factored_attention_reference`` /
``decode_attention_reference`` run in fp32 on upcast inputs is under ``common.TOL[dtype]``; sampling
when every drawn id equals the reference's. bf16, fp16 and fp32 (fp32 only where ``auto`` sends it
to the kernels). ``--dry-run``: CPU, Triton interpreter, toy shapes, fp32. Exit 1 when a case fails.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from fastjukebox.settings import DEFAULT_TEMPERATURE

from . import common as gb

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOY = dict(name="toy", seq_len=64, head_dim=24, heads=2, block_len=16,
           patterns=("block", "dense", "prev_block", "prime", "transpose", "cross"), prime_len=40, encoder_len=32)


def _models(dry: bool, n_ctx: int) -> list[dict]:
    if dry:
        return [TOY]
    from kernels.variants import MODELS
    return [dict(name=m.name, seq_len=min(m.seq_len, n_ctx - n_ctx % m.block_len), head_dim=m.head_dim,
                 heads=m.heads, block_len=m.block_len, patterns=m.patterns,
                 prime_len=m.prime_len and min(m.prime_len, n_ctx // 2), encoder_len=m.encoder_len) for m in MODELS]


def _attention_case(m: dict, pattern: str, dtype: torch.dtype, device: str, gen: torch.Generator) -> dict:
    from kernels.factored_attention.ops import factored_attention
    from kernels.factored_attention.reference import factored_attention_reference

    T, H, D = m["seq_len"], m["heads"], m["head_dim"]
    S = m["encoder_len"] if pattern == "cross" else T
    q, k, v = (torch.randn(1, n, H, D, generator=gen).to(device, dtype).requires_grad_()
               for n in (T, S, S))
    kw = dict(block_len=m["block_len"], causal=pattern not in ("prev_block", "cross"),
              prime_len=m["prime_len"] if pattern == "prime" else None)
    o = factored_attention(q, k, v, pattern, **kw)
    do = torch.randn(o.shape, generator=gen).to(device, dtype)
    got = (o, *torch.autograd.grad(o, (q, k, v), do))
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    o32 = factored_attention_reference(q32, k32, v32, pattern, **kw)
    ref = (o32, *torch.autograd.grad(o32, (q32, k32, v32), do.float()))
    return {name: gb.rel_rms(a, b) for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref)}


def _cache_shape(m: dict, pattern: str) -> tuple:
    C, H, D = m["block_len"], m["heads"], m["head_dim"]
    return {"block": (1, C, H, D), "prev_block": (1, 2, C, H, D), "transpose": (1, C, m["seq_len"] // C, H, D),
            "dense": (1, m["seq_len"], H, D), "prime": (1, m["prime_len"] or 1, H, D),
            "cross": (1, m["encoder_len"] or 1, H, D)}[pattern]


def _decode_case(m: dict, pattern: str, T: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> dict:
    from kernels.decode_attention.ops import decode_attention
    from kernels.decode_attention.reference import decode_attention_reference

    C = m["block_len"]
    pos = m["seq_len"] - C + (C - T if pattern != "transpose" else 0)   # last block: T queries to its end
    if pattern == "transpose":
        T = 1
    kc, vc = (torch.randn(_cache_shape(m, pattern), generator=gen).to(device, dtype) for _ in range(2))
    q = torch.randn(1, T, m["heads"], m["head_dim"], generator=gen).to(device, dtype)
    prime = m["prime_len"] if pattern == "prime" else None
    got = decode_attention(q, kc, vc, pattern, pos, C, prime)
    ref = decode_attention_reference(q.float(), kc.float(), vc.float(), pattern, pos, C, prime)
    return {"o": gb.rel_rms(got, ref)}


def _sampling_case(dtype: torch.dtype, device: str, gen: torch.Generator, top_k: int, top_p: float) -> dict:
    from kernels.sampling.ops import sample_logits
    from kernels.sampling.reference import exponential_noise, sample_logits_reference

    logits = (3 * torch.randn(64, 2048, generator=gen)).to(device, dtype)
    noise = exponential_noise((64, 2048), device, torch.Generator(device).manual_seed(1))
    got = sample_logits(logits, DEFAULT_TEMPERATURE, top_k, top_p, noise=noise)
    ref = sample_logits_reference(logits.float(), DEFAULT_TEMPERATURE, top_k, top_p, noise=noise)
    return {"mismatched_ids": int((got != ref).sum())}


def row_key(row: dict) -> tuple:
    return (row["kernel"], row["case"], row["dtype"])


def render(doc: dict) -> str:
    lines = [f"# Kernel correctness on {doc['device']}", "", doc.get("note", ""), "",
             "Tolerance (relative RMS vs the fp32 reference): "
             + ", ".join(f"{k} {v:g}" for k, v in doc["tolerance_rel_rms"].items()) + "; sampling: identical ids.", "",
             "| kernel | case | dtype | errors | ok |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        err = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in r["errors"].items())
        lines.append(f"| {r['kernel']} | {r['case']} | {r['dtype']} | {err or r.get('error', '')} | "
                     f"{'yes' if r['ok'] else '**NO**'} |")
    return "\n".join(lines) + "\n"


def _cases(models: list[dict], dtypes: list[str], dry: bool):
    from kernels.decode_attention.ops import takes as decode_takes
    from kernels.factored_attention.ops import takes as attn_takes

    for dname in dtypes:
        dtype = DTYPES[dname]
        for m in models:
            for pattern in m["patterns"]:
                if dry or attn_takes(dtype, m["head_dim"]):
                    yield "factored_attention", f"{m['name']} {pattern}", dname, \
                        lambda d, g, m=m, p=pattern, t=dtype: _attention_case(m, p, t, d, g)
                if pattern == "cross" and not m["encoder_len"]:
                    continue
                for T in (1, 16):
                    if (dry or decode_takes(dtype, m["head_dim"])) and (T == 1 or pattern != "transpose"):
                        yield "decode_attention", f"{m['name']} {pattern} T={T}", dname, \
                            lambda d, g, m=m, p=pattern, T=T, t=dtype: _decode_case(m, p, T, t, d, g)
        for top_k, top_p in ((0, 0.0), (64, 0.0), (0, 0.9)):
            yield "sample_logits", f"V=2048 top_k={top_k} top_p={top_p}", dname, \
                lambda d, g, k=top_k, p=top_p, t=dtype: _sampling_case(t, d, g, k, p)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.kernel_check", description=__doc__.split("\n\n")[0])
    gb.add_common_args(p)
    p.add_argument("--n-ctx", type=int, default=2048, help="cut every model's window to this many positions")
    p.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES))
    gb.add_worker_args(p, "compile and check")
    args = p.parse_args(argv)
    gb.start("benchmarks.gpu.kernel_check", args.dry_run)
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    dtypes = args.dtypes or (["fp32"] if dry else list(DTYPES))
    header = {**gb.run_info(), "tolerance_rel_rms": {str(k).removeprefix("torch."): v for k, v in gb.TOL.items()}}
    results = gb.ResultsFile("kernel-check", gb.device_label(dry), args.out_dir, dry, header, row_key, render,
                             resume=args.resume)
    todo = [c for c in gb.shard(_cases(_models(dry, args.n_ctx), dtypes, dry), args.shard) if not results.done(c[:3])]
    failed = []
    if args.workers > 1 and todo:
        # each Triton compile runs on one core: cut the cases among child processes, merge their rows
        import tempfile
        with tempfile.TemporaryDirectory(prefix="kernel-check-workers-") as tmp:
            docs = gb.run_workers("benchmarks.gpu.kernel_check", sys.argv[1:] if argv is None else argv,
                                  args.workers, Path(tmp))
        came = {row_key(r): r for d in docs for r in d["rows"]}
        for case in todo:                       # in the cases' order, whichever worker ran them
            if case[:3] in came:
                results.add(came[case[:3]])
        missing = [c[:3] for c in todo if not results.done(c[:3])]
        failed = [row_key(r) for r in results.doc["rows"] if not r["ok"]] + missing
        if missing:
            print(f"kernel check: {len(missing)} case(s) came back from no worker: {missing}", file=sys.stderr)
        return gb.finish(results, render, dry, failed, "kernel check failed")

    from fastjukebox.progress import track
    gen = torch.Generator().manual_seed(0)
    for kernel, case, dname, run in track(todo, "kernel check", "case"):
        row = dict(kernel=kernel, case=case, dtype=dname, errors={})
        try:
            row["errors"] = run(device, gen)
            tol = gb.TOL[DTYPES[dname]]
            row["ok"] = all((v == 0) if k == "mismatched_ids" else (v == v and v < tol)
                            for k, v in row["errors"].items())
        except Exception as e:      # noqa: BLE001 - a failing kernel is a result, the rest still runs
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
        results.add(row)
        if not row["ok"]:
            failed.append(row_key(row))
    return gb.finish(results, render, dry, failed, "kernel check failed")


if __name__ == "__main__":
    sys.exit(main())
