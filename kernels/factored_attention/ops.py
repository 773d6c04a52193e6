"""Launchers, autograd and the public Triton factored attention (same contract as ``reference.py``).

``factored_attention`` runs the Triton kernels for ``dense``, ``block``, ``transpose``,
``prev_block``, ``prime`` and ``cross`` (``cross`` is ``dense`` without a causal mask over the
encoder keys). ``summary`` and float64 inputs fall back to ``factored_attention_reference``.
Inputs must be CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before Triton is
imported (the tests do that).
"""
from __future__ import annotations

import math

import torch
import triton

from .kernel import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel, attn_fwd_kernel
from .reference import PATTERNS, factored_attention_reference

__all__ = ["factored_attention", "supports", "attn_fwd", "attn_bwd", "FactoredAttentionFunction", "MAX_HEAD_DIM", "takes",
           "KERNEL_PATTERNS"]

MAX_HEAD_DIM = 512
KERNEL_PATTERNS = ("dense", "block", "transpose", "prev_block", "prime", "cross")
_PATTERN_IDS = {"dense": 0, "prime": 0, "cross": 0, "block": 1, "transpose": 2, "prev_block": 3}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return type(attn_fwd_kernel).__name__ == "InterpretedFunction"


FP32_MAX_HEAD_DIM = 128   # wider fp32 tiles spill registers on sm_90 (kernels.compile_check)


def takes(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``auto`` sends this dtype and head dim to the kernels: fp16/bf16 up to
    ``MAX_HEAD_DIM``, fp32 up to ``FP32_MAX_HEAD_DIM`` (wider fp32 runs the reference)."""
    limit = FP32_MAX_HEAD_DIM if dtype == torch.float32 else MAX_HEAD_DIM
    return dtype in _DTYPES and 0 < head_dim <= limit


def supports(q: torch.Tensor) -> bool:
    """Whether the kernels take these queries under ``auto``: CUDA, 4-D, ``takes(dtype, head dim)``."""
    return q.is_cuda and q.dim() == 4 and takes(q.dtype, q.shape[-1])


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


SMEM_BUDGET = 160 * 1024  # bytes of staged tiles per program; below the ~227 KiB of an H100 SM


def _tiles(pattern_id: int, D: int, elem_bytes: int, T: int, n_keys: int, C: int, backward: bool = False) -> dict:
    """Tile sizes and launch options of the forward kernel, or (``backward``) of both backward kernels.

    ``BT`` (queries) and ``BS`` (keys) shrink with the head dim so the fp32 accumulators stay in
    registers, and are capped by the extent a tile can cover (one block, one column, the key
    count) so short layouts do not pay for masked rows. Pipeline stages, then tiles, shrink until
    the staged tiles fit ``SMEM_BUDGET`` (an estimate: resident tiles plus ``num_stages`` copies of
    the streamed ones; forward: q against k, v; dq: q, do against k, v; dk/dv: k, v against q, do)."""
    BLOCK_D = _pow2_at_least(D)
    # sized from sm_90 ptxas reports (kernels.compile_check): larger tiles spill registers
    BT = 64 if BLOCK_D <= 128 else 32 if BLOCK_D <= 256 else 16
    forward_256 = not backward and BLOCK_D == 256 and elem_bytes < 4
    if forward_256:
        BT = 16                     # 32 spilled 40-124 B in the forward on sm_80 under triton 3.6
    BS = 64 if BLOCK_D <= 64 else 32 if BLOCK_D <= 128 else 16
    if elem_bytes == 4:             # fp32 tiles (split in two for tf32x3) hold twice the registers
        BT, BS = (16, 16) if BLOCK_D >= 128 else (max(16, BT // 2), max(16, BS // 2))
    if pattern_id in (1, 3):        # a tile lies in one block when BT divides C
        BT = min(BT, _pow2_at_least(C))
        BS = min(BS, _pow2_at_least(C))
    elif pattern_id == 2:           # rows of one column
        rows = -(-T // C)
        BT = min(BT, _pow2_at_least(rows))
        BS = min(BS, _pow2_at_least(rows))
    else:
        BT = min(BT, _pow2_at_least(T))
        BS = min(BS, _pow2_at_least(n_keys))
    # backward above BLOCK_D 256: the software pipeline's extra live registers spilled dk/dv
    # (sm_80 causal transpose: 136 B with 3 stages, 0 with 1; kernels.compile_check)
    num_stages = 1 if backward and BLOCK_D > 256 else 3

    def staged_bytes() -> int:
        if backward:
            rows = max(2 * BT + num_stages * 2 * BS, 2 * BS + num_stages * 2 * BT)
        else:
            rows = BT + num_stages * 2 * BS
        return rows * BLOCK_D * elem_bytes

    while staged_bytes() > SMEM_BUDGET and num_stages > 1:
        num_stages -= 1
    while staged_bytes() > SMEM_BUDGET and max(BT, BS) > 16:
        if BT >= BS:
            BT //= 2
        else:
            BS //= 2
    num_warps = 4 if BLOCK_D <= 64 else 8
    if forward_256:
        num_warps = 4               # with 8 the 16-row tile still spilled 4 B (sm_90, cross, triton 3.9)
    return dict(BT=BT, BS=BS, BLOCK_D=BLOCK_D, num_warps=num_warps, num_stages=num_stages)


def preprocess_tile(T: int, block_d: int) -> int:
    """Rows per program of ``attn_bwd_preprocess_kernel``: two fp32 ``[rows, block_d]`` tiles of at
    most 4096 elements each (larger ones spill registers: 16 rows at head dim 480 spilled 260 B on
    sm_90). No ``tl.dot`` here, so any power of two works."""
    return min(64, max(1, 4096 // block_d), _pow2_at_least(T, floor=1))


def _grid(pattern_id: int, n: int, C: int, tile: int, B: int, H: int) -> tuple[int, int, int]:
    """Programs over ``n`` rows (queries or keys): contiguous tiles, or tiles per transpose column
    (only the ``min(C, n)`` columns that hold a position)."""
    if pattern_id == 2:
        return (min(C, n) * triton.cdiv(triton.cdiv(n, C), tile), H, B)
    return (triton.cdiv(n, tile), H, B)


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: fp32 inputs use tf32 only when torch allows it for matmuls, else
    ``tf32x3`` (three tf32 products: about fp32 accuracy on the tensor cores; an ``ieee`` fp32
    dot runs on the FMA units and spills kilobytes of registers per thread at these tiles)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return "ieee"


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def attn_fwd(q, k, v, pattern_id: int, C: int, causal: bool, n_keys: int, scale: float):
    """q [B, T, H, D], k/v [B, S, H, D] -> o [B, T, H, D] (q's dtype), lse [B, H, T] fp32 (natural log;
    ``-inf`` on rows that see no key)."""
    B, T, H, D = q.shape
    S = k.shape[1]
    o = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    cfg = _tiles(pattern_id, D, q.element_size(), T, n_keys, C)
    sq, sk, sv = _strides(q), _strides(k), _strides(v)
    attn_fwd_kernel[_grid(pattern_id, T, C, cfg["BT"], B, H)](
        q=q, k=k, v=v, o=o, lse=lse,
        s_qb=sq[0], s_qt=sq[1], s_qh=sq[2], s_kb=sk[0], s_kt=sk[1], s_kh=sk[2], s_vb=sv[0], s_vt=sv[1], s_vh=sv[2],
        T=T, S=S, N_KEYS=n_keys, C=C, qk_scale=scale * _LOG2E, H=H, D=D,
        CAUSAL=causal, PATTERN=pattern_id, INPUT_PRECISION=_precision(q.dtype), **cfg,
    )
    return o, lse


def attn_bwd(q, k, v, o, lse, do, pattern_id: int, C: int, causal: bool, n_keys: int, scale: float):
    """Gradients of ``attn_fwd``: dq [B, T, H, D], dk/dv [B, S, H, D] (contiguous, input dtypes).

    Two kernels without atomics: one program per query tile for dq and one per key tile for dk/dv.
    Each recomputes the probabilities from lse, which costs one extra ``q.k`` product, but the
    result is deterministic and no fp32 scratch copy of dq is needed; the key-to-query map is as
    simple as the query-to-key one for every pattern (same block, same column, next block)."""
    B, T, H, D = q.shape
    S = k.shape[1]
    do = do.contiguous()
    cfg = _tiles(pattern_id, D, q.element_size(), T, n_keys, C, backward=True)
    delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    BT_pre = preprocess_tile(T, cfg["BLOCK_D"])
    attn_bwd_preprocess_kernel[(triton.cdiv(T, BT_pre), H, B)](
        o=o, do=do, delta=delta, T=T, H=H, D=D, BT=BT_pre, BLOCK_D=cfg["BLOCK_D"])

    dq = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, S, H, D, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, S, H, D, dtype=v.dtype, device=q.device)
    sq, sk, sv = _strides(q), _strides(k), _strides(v)
    common = dict(
        q=q, k=k, v=v, do=do, lse=lse, delta=delta,
        s_qb=sq[0], s_qt=sq[1], s_qh=sq[2], s_kb=sk[0], s_kt=sk[1], s_kh=sk[2], s_vb=sv[0], s_vt=sv[1], s_vh=sv[2],
        T=T, S=S, N_KEYS=n_keys, C=C, qk_scale=scale * _LOG2E, scale=scale, H=H, D=D,
        CAUSAL=causal, PATTERN=pattern_id, INPUT_PRECISION=_precision(q.dtype), **cfg,
    )
    attn_bwd_dq_kernel[_grid(pattern_id, T, C, cfg["BT"], B, H)](dq=dq, **common)
    attn_bwd_dkdv_kernel[_grid(pattern_id, S, C, cfg["BS"], B, H)](dk=dk, dv=dv, **common)
    return dq, dk, dv


class FactoredAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o and lse; the backward recomputes probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, pattern_id, C, causal, n_keys, scale):
        o, lse = attn_fwd(q, k, v, pattern_id, C, causal, n_keys, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (pattern_id, C, causal, n_keys, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attn_bwd(q, k, v, o, lse, do, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def _check(q, k, v, pattern, block_len, prime_len):
    """Validate inputs for the kernel path; returns ``(C, n_keys)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D]; got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    B, T, H, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, H, D):
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch, heads or head dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} exceeds the kernels' limit of {MAX_HEAD_DIM}; use the reference")
    if not q.is_cuda and not _interpreting():
        raise ValueError(f"the Triton kernels need CUDA tensors (got {q.device}); to run them on the CPU set "
                         "TRITON_INTERPRET=1 before kernels.factored_attention.kernel is imported")
    S = k.shape[1]
    if pattern in ("block", "transpose", "prev_block"):
        if not block_len or block_len < 1:
            raise ValueError(f"{pattern} attention needs a positive block_len; got {block_len!r}")
        if S != T:
            raise ValueError(f"{pattern} attention needs as many keys as queries; got {S} keys, {T} queries")
        return int(block_len), T
    if pattern == "prime":
        if prime_len is None or prime_len < 0:
            raise ValueError(f"prime attention needs prime_len >= 0; got {prime_len!r}")
        return 1, min(int(prime_len), S)
    return 1, S


def factored_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str,
                       block_len: int | None = None, causal: bool = True,
                       prime_len: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Factored attention of one pattern with Triton kernels (forward and backward).

    Args:
        q: ``[B, T, H, D]`` queries, fp32 / fp16 / bf16, ``D <= 512``; any batch/time/head strides
            (views of a fused projection are read in place), unit feature stride preferred.
        k, v: ``[B, S, H, D]``; ``S == T`` for block / transpose / prev_block.
        pattern: one of ``PATTERNS``; ``summary`` (and float64 inputs) run the reference.
        block_len: ``C``, required for block / transpose / prev_block / summary.
        causal: keep only ``j <= i`` (ignored by prev_block and cross).
        prime_len: visible keys for ``prime``.
        scale: defaults to ``1 / sqrt(D)``.
    Returns:
        ``[B, T, H, D]`` in q's dtype; differentiable in q, k and v.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown attention pattern {pattern!r}; expected one of {PATTERNS}")
    if pattern == "summary" or q.dtype == torch.float64:
        return factored_attention_reference(q, k, v, pattern, block_len=block_len, causal=causal,
                                            prime_len=prime_len, scale=scale)
    if q.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; expected one of {_DTYPES} (or float64 via the reference)")
    C, n_keys = _check(q, k, v, pattern, block_len, prime_len)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    causal = bool(causal) and pattern not in ("prev_block", "cross")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return FactoredAttentionFunction.apply(q, k, v, _PATTERN_IDS[pattern], C, causal, n_keys, scale)
