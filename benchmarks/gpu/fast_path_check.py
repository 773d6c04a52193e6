"""GPU check of the fast sampling path: bf16 logits of the captured step against the reference path.

    python -m benchmarks.gpu.fast_path_check [--preset upsampler_level_0] [--batch 4] [--steps 64]

An upsampler-sized prior with random weights is converted to bf16 once; a window is primed just
before a block boundary and ``--steps`` tokens are sampled by ``StaticStepDecoder`` replaying a
CUDA graph (Triton decode attention and sampling). The same tokens are then fed, teacher-forced,
through ``WindowDecoder.step`` in bf16 with the plain-PyTorch reference attention and in fp32; the
check reports, per comparison, the worst per-step ``max|a - b| / max|b|`` of the logits and passes
when the graph's logits are within ``--tol`` of the bf16 reference path. It also checks that the
graph replays exactly what the same step computes eagerly, and times tokens/s of the existing
eager ``WindowDecoder`` loop, the fast step run eagerly and the fast step replayed.

Without CUDA it refuses to run (exit 2); ``--dry-run`` runs the code path on the CPU at toy size
(no graphs, no Triton, numbers meaningless). Exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

NO_CUDA_EXIT = 2


def _inputs(c, batch: int, known: int, seed: int, device):
    g = torch.Generator().manual_seed(seed)
    upper = torch.randint(0, c.l_bins, (batch, c.n_ctx // c.cond_downsample), generator=g)
    genres, artists = c.y_bins
    labels = torch.full((batch, c.label_len), -1, dtype=torch.long)
    labels[:, 0], labels[:, 1], labels[:, 2] = 4 * c.sample_length, 0, c.sample_length
    labels[:, 3] = torch.randint(0, artists, (batch,), generator=g)
    labels[:, 4:6] = torch.randint(0, genres, (batch, 2), generator=g)
    codes = torch.randint(0, c.l_bins, (batch, known), generator=g)
    return upper.to(device), labels.to(device), codes.to(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _fresh(prior, batch, inputs, chunk):
    from fastjukebox.decoding import WindowDecoder
    upper, labels, codes = inputs
    dec = WindowDecoder(prior, batch)
    dec.begin(upper, labels)
    dec.prime(codes, chunk_size=chunk)
    return dec


def _fast_run(prior, batch, inputs, chunk, steps, graphs, knobs, seed, device):
    """(logits (steps, N, bins), ids (steps, N)) of the fast step from a freshly primed window."""
    from fastjukebox.fast_decode import StaticStepDecoder
    dec = _fresh(prior, batch, inputs, chunk)
    fast = StaticStepDecoder(dec, cuda_graphs=graphs)
    fast.bind(generator=torch.Generator(device).manual_seed(seed), **knobs)
    logits, ids = [], []
    for _ in range(steps):
        fast.step()
        logits.append(fast.logits.clone())
        ids.append(fast.ids.clone())
    _sync(device)
    return torch.stack(logits), torch.stack(ids), fast


def _teacher_forced(prior, batch, inputs, chunk, ids, backend: str):
    """Logits (steps, N, bins) of ``WindowDecoder.step`` fed ``ids`` under an attention backend."""
    from fastjukebox.attention import set_backend
    set_backend(backend)
    try:
        dec = _fresh(prior, batch, inputs, chunk)
        out = []
        for t in range(ids.shape[0]):
            out.append(dec.step().clone())
            dec.push(ids[t])
        return torch.stack(out)
    finally:
        set_backend(None)


def _tokens_per_s(fn, prior, batch, inputs, chunk, warmup, steps, device) -> float:
    dec = _fresh(prior, batch, inputs, chunk)
    step = fn(dec)
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="upsampler_level_0", help="prior preset (random weights)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=64, help="steps compared against the reference path")
    p.add_argument("--timing-steps", type=int, default=256, help="steps timed per method")
    p.add_argument("--chunk-size", type=int, default=64, help="priming chunk")
    p.add_argument("--tol", type=float, default=5e-2, help="max relative logit error vs the bf16 reference path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results as JSON here (atomically)")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy size, no graphs or Triton: code path only")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("fast_path_check: no CUDA device is available; this check compares the CUDA-graph / Triton "
              "fast path with the reference path on a GPU and refuses to run on the CPU (--dry-run checks the "
              "code path at toy size).", file=sys.stderr)
        return NO_CUDA_EXIT

    from fastjukebox import Prior
    from fastjukebox.config import PriorConfig
    from fastjukebox.sampling import sample_logits

    device = "cpu" if args.dry_run else "cuda"
    torch.manual_seed(args.seed)
    if args.dry_run:
        cfg = PriorConfig(level=0, n_ctx=512, width=64, depth=6, heads=1, attn_order=2, blocks=16, l_bins=128,
                          cond_width=32, cond_depth=2, cond_dilation_growth_rate=3, cond_dilation_cycle=8,
                          cond_c_res=True, y_bins=(10, 20), t_bins=32, max_bow_genre_size=5, init_scale=2.0)
        with torch.device(device):
            base = Prior(cfg)
        args.steps, args.timing_steps = min(args.steps, 24), min(args.timing_steps, 16)
    else:
        with torch.device(device):
            base = Prior.from_preset(args.preset)
    base = base.eval().requires_grad_(False)
    c = base.config
    C = c.block_len
    # prime so that the compared steps cross a block boundary mid-way
    known = max(1, (c.n_ctx // 2) // C * C - args.steps // 2)
    if known + max(args.steps, 8 + args.timing_steps) > c.n_ctx:
        raise SystemExit(f"--steps/--timing-steps do not fit a window of {c.n_ctx} after {known} known codes")
    inputs = _inputs(c, args.batch, known, args.seed + 1, device)
    knobs = dict(temperature=0.98, top_k=0, top_p=0.0)
    graphs = not args.dry_run

    prior32 = base                                    # fp32 weights: the precise reference
    prior16 = _bf16_copy(base)                        # weights converted once
    fast_logits, fast_ids, fast = _fast_run(prior16, args.batch, inputs, args.chunk_size, args.steps, graphs, knobs,
                                            args.seed, device)
    eager_logits, eager_ids, _ = _fast_run(prior16, args.batch, inputs, args.chunk_size, args.steps, False, knobs,
                                           args.seed, device)
    ref16 = _teacher_forced(prior16, args.batch, inputs, args.chunk_size, fast_ids, "reference")
    ref32 = _teacher_forced(prior32, args.batch, inputs, args.chunk_size, fast_ids, "reference")
    per_step = lambda a, b: max(_rel(a[t], b[t]) for t in range(a.shape[0]))   # noqa: E731
    g = torch.Generator(device).manual_seed(args.seed)
    ref_ids = torch.stack([sample_logits(ref16[t], generator=g, **knobs) for t in range(args.steps)])
    res = {
        "device": torch.cuda.get_device_name() if graphs else "cpu (dry run)",
        "preset": "toy (dry run)" if args.dry_run else args.preset, "batch": args.batch, "steps": args.steps,
        "first_position": known, "block_len": C, "backend": fast.backend, "cuda_graphs": fast.use_graphs,
        "max_rel_fast_vs_ref_bf16": per_step(fast_logits, ref16),
        "max_rel_fast_vs_ref_fp32": per_step(fast_logits, ref32),
        "max_rel_ref_bf16_vs_ref_fp32": per_step(ref16, ref32),
        "graph_equals_eager": bool(torch.equal(fast_logits, eager_logits) and torch.equal(fast_ids, eager_ids)),
        "max_rel_graph_vs_eager": per_step(fast_logits, eager_logits),
        "ids_agree_with_ref_bf16": float((ref_ids == fast_ids).float().mean()),
    }

    def eager_loop(dec):
        gen = torch.Generator(device).manual_seed(1)
        return lambda: dec.push(sample_logits(dec.step(), generator=gen, **knobs))

    def fast_step(use_graphs):
        def make(dec):
            from fastjukebox.fast_decode import StaticStepDecoder
            f = StaticStepDecoder(dec, cuda_graphs=use_graphs)
            f.bind(generator=torch.Generator(device).manual_seed(1), **knobs)
            return f.step
        return make

    methods = {"window_decoder_eager": eager_loop, "fast_step_eager": fast_step(False)}
    if graphs:
        methods["fast_step_graph"] = fast_step(True)
    res["tokens_per_s"] = {name: _tokens_per_s(fn, prior16, args.batch, inputs, args.chunk_size, 8,
                                               args.timing_steps, device) for name, fn in methods.items()}
    # the graph replays the eager step's kernels: anything but a bit-exact match beyond 1e-3 is a bug
    ok = res["max_rel_fast_vs_ref_bf16"] <= args.tol and res["max_rel_graph_vs_eager"] <= 1e-3
    res["tol"], res["passed"] = args.tol, ok
    print(json.dumps(res, indent=2))
    if args.out is not None:
        from fastjukebox.atomic import atomic_path
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(res, indent=2) + "\n")
    if not ok:
        print("fast_path_check: FAILED (see max_rel_fast_vs_ref_bf16 / max_rel_graph_vs_eager)", file=sys.stderr)
    return 0 if ok else 1


def _bf16_copy(prior):
    """A bf16 copy of ``prior``: the one conversion of the weights."""
    import copy
    return copy.deepcopy(prior).to(torch.bfloat16)


if __name__ == "__main__":
    sys.exit(main())
