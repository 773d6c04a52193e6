"""Autoregressive decoding speed of the released priors on one GPU: tokens/s and HBM-roofline fraction.

    python -m benchmarks.gpu.decode_speed                                    # 3 models x batch 1, 16 x attention paths
    python -m benchmarks.gpu.decode_speed --models prior_5b --batches 16 --resume
    python -m benchmarks.gpu.decode_speed --dry-run --out-dir /tmp/d         # CPU, toy sizes: code path only

Each released architecture (``upsampler_level_0``, ``prior_1b_lyrics``, ``prior_5b``) is built
whole with random weights in bf16 on the GPU (built in fp32 there, then cast: the 5b peaks at
~30 GB), one model at a time. A ``WindowDecoder`` begins a window (real conditioning: upper codes
for the upsampler, random labels and lyrics) and is then moved to the steady state of a level-0
window, ``--known`` (default 7/8) of ``n_ctx`` music tokens already known: instead of priming
them for real, random tokens go into its token buffer and random keys/values into every
self-attention layer's static cache (``seek``). Timing does not depend on those values.

Timed: ``--steps`` iterations of the sampling loop of ``fastjukebox.sampling.sample_window``
(``decoder.step()`` -> ``sample_logits(temperature=0.99)`` -> ``decoder.push``), between CUDA
events, after one untimed pass; each repetition starts again at the same position; tokens/s
is ``batch * steps`` over the median time of ``--repeats`` repetitions. Every model and batch
runs once per attention path: ``triton`` (``kernels.decode_attention``) when it imports, and
``reference`` (the plain-PyTorch cached attention).

Roofline: the bytes one step must move through device memory (``step_bytes``: every weight the
step multiplies by, the keys/values each layer reads at that position, the key/value written,
and the per-sample rows: token/position/conditioning embeddings in, logits out) over the
bandwidth of a large device-to-device copy measured in the same run (bytes read + written).
``roofline_tokens_per_s = batch / (bytes / bandwidth)``; ``roofline_fraction`` = measured / that.
Activations between layers (a few KB per sample) are left out.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch
from fastjukebox.settings import DEFAULT_TEMPERATURE

from . import common as gb

MODELS = ("upsampler_level_0", "prior_1b_lyrics", "prior_5b")
BATCHES = (1, 16)
TEMPERATURE = DEFAULT_TEMPERATURE
COPY_BYTES = 2 * 2 ** 30          # per copy buffer: far beyond the L2 of any GPU


# --- what one step reads and writes --------------------------------------------------------------
def step_weight_elements(config) -> int:
    """Parameters one decoding step multiplies by: every transformer layer (layer norms,
    projections, MLP; a cross layer's query projection only, its encoder keys being cached once
    per window) and the output projection. Embedding tables are read one row per sample (see
    ``step_bytes``); conditioner and lyric encoder run once per window."""
    from fastjukebox.attention import layer_patterns
    W, ns, hidden = config.width, config.n_state, int(config.m_mlp * config.width)
    total = 0
    for p in layer_patterns(config.attn_order, config.depth):
        qkv = ns if p == "cross" else 3 * ns
        total += 2 * 2 * W                          # ln_0, ln_1 (weight + bias)
        total += W * qkv + qkv + ns * W + W         # c_attn, c_proj
        total += W * hidden + hidden + hidden * W + W   # mlp c_fc, c_proj
    return total + config.bins * W                  # x_out (no bias)


def step_kv_keys(config, pos: int) -> tuple[int, int]:
    """(keys read, keys written) per sample and head summed over layers, for the query at
    sequence position ``pos`` (lyric prefix included), in the static cache's layouts."""
    from fastjukebox.attention import layer_patterns
    C = config.block_len
    b, s0 = divmod(pos, C)
    P = config.prime_len or 0
    reads = {"block": s0 + 1, "prev_block": C if b else 0, "transpose": b + 1, "dense": pos + 1,
             "prime": min(pos + 1, P), "cross": config.encoder_len}
    writes = {"block": 1, "prev_block": 1, "transpose": 1, "dense": 1, "prime": int(pos < P), "cross": 0}
    pats = layer_patterns(config.attn_order, config.depth)
    return sum(reads[p] for p in pats), sum(writes[p] for p in pats)


def has_x_cond(config) -> bool:
    return (not config.is_top) or config.labels


def step_bytes(config, batch: int, positions, item: int) -> dict:
    """Mean bytes per step over the query ``positions`` (sequence positions) at ``item`` bytes per
    element: ``weights``, ``kv_read``, ``kv_write`` (keys and values), ``rows`` (per sample: the
    token and position embedding rows and the conditioning row in, the logits out) and ``total``."""
    positions = list(positions)
    keys = [step_kv_keys(config, p) for p in positions]
    kv_elem = 2 * batch * config.n_state * item      # keys + values of one position, whole batch
    out = {
        "weights": step_weight_elements(config) * item,
        "kv_read": kv_elem * sum(r for r, _ in keys) / len(keys),
        "kv_write": kv_elem * sum(w for _, w in keys) / len(keys),
        "rows": batch * item * ((3 if has_x_cond(config) else 2) * config.width + config.bins),
    }
    out["total"] = sum(out.values())
    return out


# --- model, window, loop -------------------------------------------------------------------------
def build_prior(config, device, dtype, seed: int):
    """The whole prior with random weights, in ``dtype`` on ``device``, eval mode, no gradients."""
    from fastjukebox.prior import Prior
    torch.manual_seed(seed)
    with torch.device(device):
        prior = Prior(config)
    return prior.to(dtype).eval().requires_grad_(False)


def random_labels(config, batch: int, gen: torch.Generator) -> torch.Tensor | None:
    """``(batch, label_len)`` label rows: a total length the timing conditioner accepts, window at
    offset 0, a random artist, one or two genres, random lyric tokens."""
    if not config.labels:
        return None
    genres, artists = config.y_bins
    total = 4 * config.sample_length
    if config.min_duration is not None:
        total = max(total, int(config.min_duration * config.sr) + config.sample_length)
    if config.max_duration is not None:
        total = min(total, int(config.max_duration * config.sr))
    y = torch.full((batch, config.label_len), -1, dtype=torch.long)
    y[:, 0], y[:, 1], y[:, 2] = total, 0, config.sample_length
    y[:, 3] = torch.randint(0, artists, (batch,), generator=gen)
    n_genres = min(2, config.max_bow_genre_size)
    y[:, 4:4 + n_genres] = torch.randint(0, genres, (batch, n_genres), generator=gen)
    if config.n_tokens:
        y[:, -config.n_tokens:] = torch.randint(0, config.n_vocab, (batch, config.n_tokens), generator=gen)
    return y


def begin_window(dec, batch: int, gen: torch.Generator) -> None:
    c = dec.config
    upper = None
    if not c.is_top:
        upper = torch.randint(0, c.l_bins, (batch, c.n_ctx // c.cond_downsample), generator=gen)
    dec.begin(upper, random_labels(c, batch, gen))


def seek(dec, known: int, gen: torch.Generator) -> None:
    """Put the decoder ``known`` music tokens into its window without priming: random codes in
    its token buffer, random keys/values in every self-attention layer's cache (cross layers keep
    the keys ``begin`` computed). A stand-in for priming that costs nothing and times the same.
    ``gen`` is a generator on the decoder's device (the 5b's caches at batch 16 hold ~16 GB)."""
    c, cache = dec.config, dec.cache
    if not 0 <= known < c.n_ctx:
        raise ValueError(f"known must be in [0, {c.n_ctx}), got {known}")
    shift = c.n_vocab if c.lyrics == "merged" else 0
    codes = torch.randint(0, c.l_bins, (dec.n, known), generator=gen, device=dec.device) + shift
    dec._tokens[:dec.n, dec.offset:dec.offset + known] = codes
    for p, k, v in zip(cache.patterns, cache.k, cache.v):
        if p != "cross":
            k.normal_(generator=gen)
            v.normal_(generator=gen)
    dec._pos = dec.offset + known


def sampling_loop(dec, steps: int, gen: torch.Generator) -> torch.Tensor:
    """``steps`` iterations of ``sample_window``'s loop; returns the last logits."""
    from fastjukebox.sampling import sample_logits
    logits = None
    for _ in range(steps):
        logits = dec.step()
        dec.push(sample_logits(logits, TEMPERATURE, generator=gen))
    return logits


def time_loop(dec, start: int, steps: int, repeats: int, gen, cuda: bool) -> tuple[list[float], bool]:
    """Milliseconds of ``steps`` loop iterations from music position ``start``, per repetition
    (one untimed pass first); and whether the logits stayed finite."""
    seek_to = dec.offset + start
    dec._pos = seek_to
    finite = bool(torch.isfinite(sampling_loop(dec, steps, gen)).all())
    times = []
    for _ in range(repeats):
        dec._pos = seek_to
        if cuda:
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0.record()
            sampling_loop(dec, steps, gen)
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1))
        else:
            t = time.perf_counter()
            sampling_loop(dec, steps, gen)
            times.append((time.perf_counter() - t) * 1e3)
    return times, finite


def logits_vs_reference(dec, start: int, path: str) -> float:
    """Relative RMS difference of one step's logits computed with attention ``path`` and with the
    reference, from the same cached state (a report, not a gate: random bf16 weights amplify
    rounding through the layers)."""
    from fastjukebox import attention
    out = []
    for name in (path, "reference"):
        dec._pos = dec.offset + start
        attention.set_backend(name)
        try:
            out.append(dec.step().float())
        finally:
            attention.set_backend(None)
    return gb.rel_rms(out[0], out[1])


def copy_bandwidth(device, nbytes: int, timing: dict) -> float:
    """Bytes per second of a ``nbytes`` device-to-device copy (read + written) of random bytes."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = gb.median_ms(lambda: dst.copy_(src), **timing)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def attention_paths() -> dict[str, str]:
    """Attention path name -> '' if usable, else why not. Registers the Triton decode kernels."""
    from fastjukebox import attention
    paths = {"reference": ""}
    try:
        from kernels.decode_attention.ops import decode_attention, supports
        from kernels.factored_attention.ops import factored_attention, supports as fa_supports
    except ImportError as e:
        paths["triton"] = f"n/a ({e})"
    else:
        attention.register_backend("triton", factored_attention, fa_supports)
        attention.register_decode_backend("triton", decode_attention, supports)
        paths["triton"] = ""
    return paths


# --- run -----------------------------------------------------------------------------------------
def run_case(prior, batch: int, path: str, start: int, steps: int, repeats: int, bandwidth: float,
             seed: int) -> dict:
    """Time one (model, batch, attention path); the row's measurements."""
    from fastjukebox import attention
    from fastjukebox.decoding import WindowDecoder
    config = prior.config
    w = prior.prior.x_emb.weight
    device, dtype = w.device, w.dtype
    gen = torch.Generator().manual_seed(seed + batch)
    dgen = torch.Generator(device=device).manual_seed(seed + batch)
    dec = WindowDecoder(prior, batch, dtype=dtype, device=device)
    attention.set_backend(path)
    try:
        begin_window(dec, batch, gen)
        seek(dec, start, dgen)
        times, finite = time_loop(dec, start, steps, repeats, dgen, device.type == "cuda")
    finally:
        attention.set_backend(None)
    check = logits_vs_reference(dec, start, path) if path != "reference" else None
    ms = statistics.median(times)
    positions = range(dec.offset + start, dec.offset + start + steps)
    nbytes = step_bytes(config, batch, positions, w.element_size())
    tps = batch * steps / (ms * 1e-3)
    roof = batch * bandwidth / nbytes["total"]
    return {"tokens_per_s": tps, "step_ms": ms / steps, "roofline_tokens_per_s": roof,
            "roofline_fraction": tps / roof, "copy_bandwidth_gbps": bandwidth / 1e9,
            "achieved_gbps": nbytes["total"] / (ms / steps * 1e-3) / 1e9,
            "bytes_per_step": nbytes, "position": start, "steps": steps, "times_ms": times,
            "logits_finite": finite, "logits_rel_rms_vs_reference": check, "cache_bytes": dec.cache.nbytes()}


def dry_configs() -> dict:
    """Toy versions of the three released shapes (same attention orders, lyric / label layout)."""
    from fastjukebox.config import PRESETS
    up, one_b, five_b = (PRESETS[m] for m in MODELS)
    small = dict(width=32, heads=2, cond_width=16, cond_depth=2)
    return {
        "toy_upsampler_level_0": up.replace(n_ctx=128, depth=3, blocks=8, **{**small, "heads": 1}),
        "toy_prior_1b_lyrics": one_b.replace(n_ctx=96, n_tokens=32, depth=16, blocks=8, **small),
        "toy_prior_5b": five_b.replace(n_ctx=128, depth=6, blocks=8, **small),
    }


def row_key(r: dict) -> tuple:
    return r["model"], r["batch"], r["attention"]


def render(doc: dict) -> str:
    lines = [f"# Autoregressive decoding: {doc['device']}", ""]
    if doc.get("dry_run"):
        lines += [f"**{gb.DRY_RUN_NOTE}**", ""]
    bw = doc.get("copy_bandwidth_gbps")
    lines += [f"Date {doc.get('date')}, torch {doc.get('machine', {}).get('torch')}, GPU {doc.get('gpu') or 'none'}, "
              f"{doc.get('dtype')}, random weights. Steady state: {doc.get('known_fraction')} of the window known, "
              f"{doc.get('steps')} steps of step + sample + push timed, median of {doc.get('repeats')}. "
              f"Roofline = bytes per step (weights + KV read/written + rows) / device-to-device copy "
              f"bandwidth {gb.fmt(bw)} GB/s.", ""]
    body = []
    errors = []
    for r in doc["rows"]:
        if "error" in r:
            errors.append(f"- {r['model']} batch {r['batch']} {r['attention']}: {r['error']}")
            body.append([r["model"], r["batch"], r["attention"]] + ["failed"] + [""] * 8)
            continue
        b = r["bytes_per_step"]
        body.append([r["model"], r["batch"], r["attention"], gb.fmt(r["tokens_per_s"], 4), gb.fmt(r["step_ms"]),
                     gb.fmt(r["roofline_tokens_per_s"], 4), gb.fmt(r["roofline_fraction"]),
                     gb.fmt(b["weights"] / 1e6), gb.fmt((b["kv_read"] + b["kv_write"]) / 1e6),
                     gb.fmt(r["achieved_gbps"]), "yes" if r["logits_finite"] else "NO",
                     gb.fmt(r.get("logits_rel_rms_vs_reference"))])
    lines.append(gb.md_table(["model", "batch", "attention", "tokens/s", "ms/step", "roofline tokens/s",
                              "fraction", "weights MB/step", "KV MB/step", "achieved GB/s", "finite logits",
                              "logits vs reference (rel. RMS)"], body))
    if errors:
        lines += ["", "Failed cases:", *errors, ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.decode_speed", description=__doc__.split("\n\n")[0])
    gb.add_common_args(p)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), help="(a dry run caps them at 2)")
    p.add_argument("--attention", nargs="+", default=["triton", "reference"], choices=["triton", "reference"])
    p.add_argument("--known", type=float, default=7 / 8, help="fraction of n_ctx already in the window")
    p.add_argument("--steps", type=int, default=64, help="decoding steps per timed repetition")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    gb.start("benchmarks.gpu.decode_speed", args.dry_run)
    if any(b < 1 for b in args.batches) or args.steps < 1 or args.repeats < 1:
        p.error("--batches, --steps and --repeats must be positive")

    dry = args.dry_run
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    # The Triton interpreter runs a toy step in ~0.1-1 s: a dry run keeps to a few steps, small batches.
    steps, repeats = (2, 1) if dry else (args.steps, args.repeats)
    batches = [min(b, 2) for b in dict.fromkeys(args.batches)] if dry else args.batches
    batches = list(dict.fromkeys(batches))
    from fastjukebox.config import PRESETS
    if dry:
        configs = {k: c for k, c in dry_configs().items() if k.removeprefix("toy_") in args.models}
    else:
        configs = {m: PRESETS[m] for m in args.models}
    timing = dict(dry_run=dry, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    bandwidth = copy_bandwidth(device, 2 ** 24 if dry else COPY_BYTES, timing)
    paths = attention_paths()
    header = {**gb.run_info(), "dtype": str(dtype).removeprefix("torch."), "known_fraction": args.known,
              "steps": steps, "repeats": repeats, "temperature": TEMPERATURE,
              "copy_bandwidth_gbps": bandwidth / 1e9, "attention_paths": paths}
    results = gb.ResultsFile("decode-speed", gb.device_label(dry), args.out_dir, dry, header, row_key, render,
                             resume=args.resume)

    from fastjukebox.progress import progress_bar
    todo = [(m, b, a) for m in configs for b in batches for a in args.attention
            if not results.done((m, b, a))]
    bar = progress_bar(len(todo), "decode", "case")
    failed = []
    for name, config in configs.items():
        mine = [t for t in todo if t[0] == name]
        if not mine:
            continue
        prior = build_prior(config, device, dtype, args.seed)
        n_params = sum(t.numel() for t in prior.parameters())
        start = int(args.known * config.n_ctx)
        if start + steps > config.n_ctx:
            raise SystemExit(f"{name}: {start} known + {steps} steps run past the window of {config.n_ctx}")
        for _, batch, path in mine:
            bar.set_postfix_str(f"{name} batch {batch} {path}")
            row = {"model": name, "batch": batch, "attention": path, "params": n_params}
            try:
                if paths.get(path):
                    raise RuntimeError(paths[path])
                row.update(run_case(prior, batch, path, start, steps, repeats, bandwidth, args.seed))
            except Exception as e:  # noqa: BLE001 - a failing case is reported in its row
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                failed.append(row_key(row))
            results.add(row)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            bar.update(1)
        del prior
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return gb.finish(results, render, dry, failed, 'failed (see their rows)')


if __name__ == "__main__":
    sys.exit(main())
