"""Launchers for the cached decoding attention kernels; same contract as ``reference.py``.

``decode_attention(q, k_cache, v_cache, pattern, pos, block_len, prime_len)`` checks the inputs,
picks a query path (one query per program for decode steps and transpose layers, ``tl.dot`` query
tiles for priming chunks), picks how many splits the visible keys are cut into
(``choose_num_splits``), launches ``decode_attention_kernel`` and, with more than one split,
``combine_splits_kernel``.

``pos`` may be a Python int or a one-element integer tensor on the queries' device: the kernel
then reads the position from memory, so a captured CUDA graph can replay a step with a new
position. Grid sizes never depend on a tensor ``pos`` (splits are sized by the cache capacity
and splits past the visible keys come back empty), and no check on it syncs with the host.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton

from .kernel import LAYOUTS, combine_splits_kernel, decode_attention_kernel

__all__ = ["decode_attention", "supports", "plan_for", "plan_launch", "choose_num_splits", "combine_tiles", "num_warps_for", "takes", "LaunchPlan", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 512
MAX_SPLITS = 64
MIN_SPLIT_KEYS = 64        # a split reads at least this many keys: shorter reads are not worth a combine
DOT_MIN_QUERIES = 4        # from this many queries on (priming chunks), use tl.dot query tiles
# widest head (padded) for the tl.dot query tiles: at 512 the tile spills 32-100 B per thread under
# triton 3.6 whatever the warps or stages (kernels.compile_check), so wider heads take one query
# per program
DOT_MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


FP32_MAX_HEAD_DIM = 128    # wider fp32 tiles spill registers on sm_90 (kernels.compile_check)


def takes(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``auto`` sends this dtype and head dim to the kernels: fp16/bf16 up to
    ``MAX_HEAD_DIM``, fp32 up to ``FP32_MAX_HEAD_DIM`` (wider fp32 runs the reference)."""
    if dtype == torch.float32:
        return 0 < head_dim <= FP32_MAX_HEAD_DIM
    return dtype in (torch.float16, torch.bfloat16) and 0 < head_dim <= MAX_HEAD_DIM


def supports(q: torch.Tensor) -> bool:
    """Whether these queries can go to the Triton kernels under ``auto``: CUDA, 4-D,
    ``takes(dtype, head dim)``."""
    return q.is_cuda and q.dim() == 4 and takes(q.dtype, q.shape[-1])


def num_warps_for(plan: "LaunchPlan") -> int:
    """Warps of ``decode_attention_kernel``: 8 for heads wider than 128 (4 spill registers), except
    one query per program at ``block_d = 512``: there 8 warps spilled 4 B on sm_80 (triton 3.9) and
    4 warps spill nothing with either triton (``kernels.compile_check``)."""
    if plan.block_t == 1 and plan.block_d >= 512:
        return 4
    return 8 if plan.block_d > 128 else 4


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def choose_num_splits(n_keys: int, programs: int, sm_count: int, block_n: int) -> tuple[int, int]:
    """(splits, keys per split) for a read of up to ``n_keys`` keys by ``programs`` programs.

    Split until about two programs per SM are busy, but never below ``MIN_SPLIT_KEYS`` keys per
    split nor above ``MAX_SPLITS`` splits; a split's length is a multiple of ``block_n``."""
    if n_keys <= 0:
        return 1, block_n
    want = max(1, math.ceil(2 * sm_count / max(programs, 1)))
    splits = max(1, min(want, MAX_SPLITS, n_keys // MIN_SPLIT_KEYS))
    return _fit_splits(n_keys, splits, block_n)


class LaunchPlan(NamedTuple):
    block_t: int        # queries per program: 1 (multiply-reduce) or 16 (tl.dot tiles)
    block_n: int        # keys per loop iteration
    block_d: int        # head dim padded to a power of two (loads are masked)
    splits: int         # programs per query row along the keys
    split_len: int      # keys per split, a multiple of block_n


def plan_launch(N: int, T: int, H: int, D: int, pattern: str, n_keys: int, device: torch.device,
                num_splits: int | None = None, sm_count: int | None = None) -> LaunchPlan:
    """Tiles and key splits for ``T`` queries of ``N * H`` rows reading up to ``n_keys`` keys.

    ``sm_count`` overrides the device's multiprocessor count (ahead-of-time planning for a GPU
    that is not present)."""
    block_d = max(16, triton.next_power_of_2(D))
    if T >= DOT_MIN_QUERIES and pattern != "transpose" and block_d <= DOT_MAX_HEAD_DIM:
        block_t, block_n = 16, (32 if block_d <= 128 else 16)
    else:
        block_t, block_n = 1, (64 if block_d <= 128 else 4096 // block_d)   # a [block_n, block_d] tile of 8192 elements, 4096 past head dim 128
    if num_splits is None:
        programs = N * H * triton.cdiv(T, block_t)
        sms = _sm_count(device) if sm_count is None else int(sm_count)
        splits, split_len = choose_num_splits(n_keys, programs, sms, block_n)
    else:
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        splits, split_len = _fit_splits(n_keys, min(int(num_splits), MAX_SPLITS), block_n)
    return LaunchPlan(block_t, block_n, block_d, splits, split_len)


def combine_tiles(splits: int, block_d: int) -> tuple[int, int]:
    """``(BLOCK_S, BLOCK_D)`` of ``combine_splits_kernel``: all splits by a slice of the head dim,
    a tile of at most 8192 elements."""
    block_s = max(2, triton.next_power_of_2(splits))
    return block_s, min(block_d, max(16, 8192 // block_s))


def _fit_splits(n_keys: int, splits: int, block_n: int) -> tuple[int, int]:
    split_len = triton.cdiv(triton.cdiv(max(n_keys, 1), splits), block_n) * block_n
    return triton.cdiv(max(n_keys, 1), split_len), split_len


def _cache_geometry(q, k_cache, v_cache, pattern, block_len, prime_len):
    """(key-axis index, ring/column axis index or None, key capacity) of a layout, after checks."""
    N, T, H, D = q.shape
    expect = {"block": 4, "prev_block": 5, "transpose": 5, "dense": 4, "prime": 4, "cross": 4}[pattern]
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != expect:
            raise ValueError(f"{pattern} {name} must have {expect} dims, got shape {tuple(c.shape)}")
        if c.shape[0] != N or tuple(c.shape[-2:]) != (H, D):
            raise ValueError(f"{name} shape {tuple(c.shape)} does not match queries [N={N}, H={H}, D={D}]")
        if c.dtype != q.dtype or c.device != q.device:
            raise ValueError(f"{name} is {c.dtype} on {c.device}; queries are {q.dtype} on {q.device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if pattern == "block":
        if k_cache.shape[1] < block_len:
            raise ValueError(f"block cache holds {k_cache.shape[1]} slots, block length is {block_len}")
        return 1, None, block_len
    if pattern == "prev_block":
        if k_cache.shape[1] != 2 or k_cache.shape[2] != block_len:
            raise ValueError(f"prev_block cache must be [N, 2, {block_len}, H, D], got {tuple(k_cache.shape)}")
        return 2, 1, block_len
    if pattern == "transpose":
        if k_cache.shape[1] != block_len:
            raise ValueError(f"transpose cache must be [N, {block_len}, blocks, H, D], got {tuple(k_cache.shape)}")
        return 2, 1, k_cache.shape[2]
    if pattern == "prime":
        if prime_len is None:
            raise ValueError("prime attention needs prime_len")
        return 1, None, max(0, min(int(prime_len), k_cache.shape[1]))
    return 1, None, k_cache.shape[1]


def _visible_keys(pattern: str, pos: int, T: int, block_len: int, capacity: int) -> int:
    """Most keys any of the queries at ``[pos, pos + T)`` reads (host-known position)."""
    b, s0 = divmod(pos, block_len)
    n = {"block": s0 + T, "prev_block": block_len if b else 0, "transpose": b + 1, "dense": pos + T,
         "prime": pos + T, "cross": capacity}[pattern]
    return min(n, capacity)


def _check_int_pos(pattern, pos, T, block_len, capacity):
    if pos < 0:
        raise ValueError(f"pos must be >= 0, got {pos}")
    if T and pattern != "cross" and pos // block_len != (pos + T - 1) // block_len:
        raise ValueError(f"queries [{pos}, {pos + T}) cross a block boundary (block length {block_len})")
    if pattern == "dense" and pos + T > capacity:
        raise ValueError(f"queries [{pos}, {pos + T}) run past the dense cache ({capacity} positions)")
    if pattern == "transpose" and pos // block_len >= capacity:
        raise ValueError(f"position {pos} is in block {pos // block_len}; the cache holds {capacity} blocks")


def _prepare(q, k_cache, v_cache, pattern, pos, block_len, prime_len, num_splits):
    """Checks; (key axis, ring/column axis, capacity, pos tensor or None, pos int, plan)."""
    if pattern not in LAYOUTS:
        raise ValueError(f"cached decoding does not support the {pattern!r} pattern")
    if q.dim() != 4:
        raise ValueError(f"q must be [N, T, H, D], got shape {tuple(q.shape)}")
    N, T, H, D = q.shape
    if not 0 < D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} is not supported (1..{MAX_HEAD_DIM})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if block_len <= 0:
        raise ValueError(f"block_len must be positive, got {block_len}")
    j_axis, r_axis, capacity = _cache_geometry(q, k_cache, v_cache, pattern, block_len, prime_len)
    if isinstance(pos, torch.Tensor):
        if pos.numel() != 1 or pos.dtype not in (torch.int32, torch.int64) or pos.device != q.device:
            raise ValueError(f"a tensor pos must be one int32/int64 element on {q.device}, got "
                             f"{pos.dtype} {tuple(pos.shape)} on {pos.device}")
        pos_ptr, pos_int, n_keys = pos.reshape(1), 0, capacity
    else:
        pos_int = int(pos)
        _check_int_pos(pattern, pos_int, T, block_len, capacity)
        pos_ptr, n_keys = None, _visible_keys(pattern, pos_int, T, block_len, capacity)
    plan = plan_launch(N, T, H, D, pattern, n_keys, q.device, num_splits)
    return j_axis, r_axis, capacity, pos_ptr, pos_int, plan


def plan_for(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pattern: str,
             pos: int | torch.Tensor, block_len: int, prime_len: int | None = None, *,
             num_splits: int | None = None) -> LaunchPlan:
    """The ``LaunchPlan`` ``decode_attention`` uses for these arguments (after the same checks)."""
    return _prepare(q, k_cache, v_cache, pattern, pos, block_len, prime_len, num_splits)[-1]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pattern: str,
                     pos: int | torch.Tensor, block_len: int, prime_len: int | None = None,
                     scale: float | None = None, *, num_splits: int | None = None) -> torch.Tensor:
    """Queries ``q: [N, T, H, D]`` at positions ``[pos, pos + T)`` (one block) -> ``[N, T, H, D]``.

    Args:
        k_cache, v_cache: one layer's static cache in ``pattern``'s layout (see ``reference.py``).
        pos: first query position, an int or a one-element int32/int64 tensor on ``q``'s device
            (read by the kernel; not range-checked, but every read is clamped to the cache).
        prime_len: visible keys of a ``prime`` layer (required there).
        scale: score scale, ``1 / sqrt(D)`` by default.
        num_splits: force the number of key splits (default: ``choose_num_splits``).
    """
    j_axis, r_axis, capacity, pos_ptr, pos_int, plan = _prepare(
        q, k_cache, v_cache, pattern, pos, block_len, prime_len, num_splits)
    N, T, H, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if N * T * H == 0:
        return out
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    BLOCK_T, BLOCK_N, BLOCK_D, splits, split_len = plan
    f32 = dict(dtype=torch.float32, device=q.device)
    if splits > 1:
        m_part = torch.empty(N, H, T, splits, **f32)
        l_part = torch.empty(N, H, T, splits, **f32)
        acc_part = torch.empty(N, H, T, splits, D, **f32)
    else:
        m_part = l_part = acc_part = out        # unused
    ks, vs = k_cache.stride(), v_cache.stride()
    kr = ks[r_axis] if r_axis is not None else 0
    vr = vs[r_axis] if r_axis is not None else 0
    decode_attention_kernel[(N * H, triton.cdiv(T, BLOCK_T), splits)](
        q, k_cache, v_cache, out, m_part, l_part, acc_part,
        pos_ptr if pos_ptr is not None else out, pos_int,
        *q.stride(),
        ks[0], kr, ks[j_axis], ks[-2], ks[-1],
        vs[0], vr, vs[j_axis], vs[-2], vs[-1],
        *out.stride(),
        T, H, D, block_len, capacity, split_len, splits, scale * LOG2E,
        LAYOUT=LAYOUTS[pattern], POS_FROM_PTR=pos_ptr is not None, SPLIT=splits > 1,
        IEEE=q.dtype == torch.float32, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        num_warps=num_warps_for(plan),
    )
    if splits > 1:
        BLOCK_S, BLOCK_DC = combine_tiles(splits, BLOCK_D)
        combine_splits_kernel[(N * H * T, triton.cdiv(D, BLOCK_DC))](
            out, m_part, l_part, acc_part, *out.stride(), T, H, D, splits,
            BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_DC,
        )
    return out
