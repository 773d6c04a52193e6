"""A *projection*, not a measurement: parallel student vs exact AR sampling at the released upsampler size.

No GPU number here was measured. For the released upsampler architecture (``PRESETS
["upsampler_level_0"]``: width 1920, 72 layers, n_ctx 8192 in blocks of 64, bf16 weights) on an
H100 SXM, per window of one level:

* exact AR, one step for a batch of ``B`` (every sample one token):
  ``t_step = max((weight_bytes + B * kv_bytes) / HBM_BANDWIDTH, B * flops_ar / PEAK_FLOPS)``,
  where ``kv_bytes`` are the keys and values one step's attention reads (averaged over the
  window's positions, per pattern) and ``flops_ar`` the forward FLOPs of one position; plus the
  known codes primed in one parallel pass (hopped windows);
* student, one pass over ``n`` positions for a batch of ``B``:
  ``t_pass = max(weight_bytes / HBM_BANDWIDTH, B * n * flops_student / (ACHIEVED_FRACTION * PEAK_FLOPS))``,
  ``n`` = the unknown positions (hopped windows, with the prefix cache; the prefix itself runs
  once more, as one pass over the known positions) or the whole window (first windows).

FLOPs per position: ``2 * (transformer + output-head weights)`` plus attention
``4 * keys * n_state`` per layer (queries against keys, then against values). The upper-level
conditioner runs once per window in both samplers and is left out. The AR step is costed at the
roofline (no overhead), which favours it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from fastjukebox.attention import layer_patterns
from fastjukebox.config import PRESETS, PriorConfig

__all__ = ["H100", "GPU", "projection", "format_projection"]


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float          # dense bf16 tensor-core FLOP/s
    hbm_bandwidth: float       # bytes/s
    achieved_fraction: float   # share of peak a student pass (large matrix products) is assumed to reach


H100 = GPU("H100 SXM", peak_flops=989e12, hbm_bandwidth=3.35e12, achieved_fraction=0.5)
BYTES = 2                      # bf16


def _keys(pattern: str, c: PriorConfig, causal: bool) -> float:
    """Keys a position's attention reads in one layer (AR: averaged over the window's positions)."""
    C, nb = c.block_len, c.n_ctx // c.block_len
    if causal:
        return {"block": (C + 1) / 2, "prev_block": C * (nb - 1) / nb, "transpose": (nb + 1) / 2}[pattern]
    return {"block": C, "prev_block": C * (nb - 1) / nb, "transpose": nb}[pattern]


def _model(c: PriorConfig) -> dict:
    n_state = c.n_state
    per_layer = c.width * 3 * n_state + n_state * c.width + 2 * c.width * int(c.m_mlp * c.width)
    weights = c.depth * per_layer + c.width * c.l_bins
    patterns = layer_patterns(c.attn_order, c.depth)
    attn = {causal: sum(4 * _keys(p, c, causal) * n_state for p in patterns) for causal in (True, False)}
    kv_bytes = sum(2 * _keys(p, c, True) * n_state * BYTES for p in patterns)
    return dict(weights=weights, weight_bytes=weights * BYTES, flops_ar=2 * weights + attn[True],
                flops_student=2 * weights + attn[False], kv_bytes=kv_bytes)


def projection(config: PriorConfig | None = None, gpu: GPU = H100, batches=(1, 16), passes=(1, 2, 4, 16),
               hop_length: int = 8) -> dict:
    """Projected seconds per window (first and hopped) and per minute of audio (``hop_length``
    samples per code: 8 for level 0) for exact AR and the student at each K."""
    c = config or PRESETS["upsampler_level_0"]
    m = _model(c)
    n, known = c.n_ctx, c.n_ctx // 2
    tokens_per_minute = 60 * c.sr / hop_length
    hopped_windows = max(0.0, (tokens_per_minute - n) / (n - known))
    rows = []
    for B in batches:
        step = max((m["weight_bytes"] + B * m["kv_bytes"]) / gpu.hbm_bandwidth, B * m["flops_ar"] / gpu.peak_flops)

        def pass_s(positions):
            return max(m["weight_bytes"] / gpu.hbm_bandwidth,
                       B * positions * m["flops_student"] / (gpu.achieved_fraction * gpu.peak_flops))

        ar_first, ar_hopped = n * step, pass_s(known) + (n - known) * step
        row = dict(batch=B, ar_step_s=step, ar_first_s=ar_first, ar_hopped_s=ar_hopped,
                   ar_s_per_minute=ar_first + hopped_windows * ar_hopped, student={})
        for K in passes:
            first, hopped = K * pass_s(n), pass_s(known) + K * pass_s(n - known)
            row["student"][K] = dict(first_s=first, hopped_s=hopped, s_per_minute=first + hopped_windows * hopped,
                                     speedup_hopped=ar_hopped / hopped, speedup_first=ar_first / first)
        rows.append(row)
    return dict(kind="projection (not measured)", gpu=asdict(gpu), bytes_per_weight=BYTES,
                config=dict(width=c.width, depth=c.depth, n_ctx=c.n_ctx, block_len=c.block_len, l_bins=c.l_bins,
                            n_state=c.n_state), model=m, hop_length=hop_length,
                hopped_windows_per_minute=hopped_windows, rows=rows)


def format_projection(p: dict) -> str:
    g, m = p["gpu"], p["model"]
    lines = [f"### Projection (not measured): released upsampler size on an {g['name']}", "",
             f"Width {p['config']['width']}, {p['config']['depth']} layers, n_ctx {p['config']['n_ctx']}, bf16; "
             f"{m['weights'] / 1e6:.0f} M transformer + head weights ({m['weight_bytes'] / 1e9:.2f} GB), "
             f"{m['flops_ar'] / 1e9:.2f} GFLOP per AR position, {m['flops_student'] / 1e9:.2f} GFLOP per student "
             f"position, {m['kv_bytes'] / 1e6:.2f} MB of keys and values read per AR step and sample. "
             f"Constants: peak {g['peak_flops'] / 1e12:.0f} TFLOP/s bf16, HBM {g['hbm_bandwidth'] / 1e12:.2f} TB/s, "
             f"student passes at {g['achieved_fraction']:.0%} of peak. AR step = max((weights + B x KV bytes) / HBM, "
             f"B x FLOPs / peak); student pass = max(weights / HBM, B x positions x FLOPs / (fraction x peak)); "
             f"hopped windows run the prefix once; {p['hopped_windows_per_minute']:.1f} hopped windows per minute "
             f"at {p['hop_length']} samples per code.", "",
             "| batch | sampler | s / first window | s / hopped window | s / minute of audio | speedup (hopped) |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in p["rows"]:
        lines.append(f"| {r['batch']} | exact AR | {r['ar_first_s']:.3g} | {r['ar_hopped_s']:.3g} | "
                     f"{r['ar_s_per_minute']:.3g} | 1.00x |")
        for K, s in r["student"].items():
            lines.append(f"| {r['batch']} | student K={K} | {s['first_s']:.3g} | {s['hopped_s']:.3g} | "
                         f"{s['s_per_minute']:.3g} | {s['speedup_hopped']:.1f}x |")
    return "\n".join(lines) + "\n"
