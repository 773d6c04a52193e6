"""Triton kernel: one program draws one row's token from its logits.

The whole vocabulary (up to 4096) sits in one masked tile; everything stays in fp32 registers and
nothing is sorted. Top-k and top-p thresholds are found by bisection over the logits' order-
preserving integer keys (``_ordered_key``): 33 masked reductions give the exact threshold value.

- top-k keeps ``x >= kth``, the k-th largest logit: the largest key ``K`` with ``#{key >= K} >= k``.
- top-p keeps every token whose more likely tokens weigh at most ``top_p`` (sorted position ``i``
  survives iff ``cum[i - 1] <= top_p``; the first token past the threshold is kept): the smallest key
  ``K`` with ``mass{key > K} <= top_p``. Tokens tied with the last kept one are all kept.
- the draw is ``argmax(p / E)`` over the kept tokens, ties to the lowest id.
"""
import triton
import triton.language as tl


# globals a kernel reads must be constexpr instances (an annotation is not enough for the compiler)
KEY_MIN = tl.constexpr(-(2 ** 40))
KEY_MAX = tl.constexpr(2 ** 40)


@triton.jit
def _ordered_key(x):
    """fp32 -> int64 with the same order (``-0.0`` and ``0.0`` equal, ``-inf`` lowest)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def sample_logits_kernel(
    logits, noise, out, V, stride_l, stride_e, temperature, top_k, top_p,
    RECIPROCAL: tl.constexpr, USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Grid ``(N,)``. ``logits``: (N, V) any float dtype; ``noise``: (N, V) fp32 Exp(1);
    ``out``: (N,) int64. ``RECIPROCAL``: ``temperature`` holds ``1 / t`` and is multiplied (as
    PyTorch does on CUDA for a division by a Python scalar); otherwise divided, rounded to nearest."""
    i_n = tl.program_id(0).to(tl.int64)
    o_v = tl.arange(0, BLOCK_V)
    m_v = o_v < V
    b_x = tl.load(logits + i_n * stride_l + o_v, mask=m_v, other=float("-inf")).to(tl.float32)   # [BV]
    if RECIPROCAL:
        b_x = b_x * temperature
    else:
        b_x = tl.math.div_rn(b_x, temperature)
    b_x = tl.where(m_v, b_x, float("-inf"))
    if USE_TOP_K or USE_TOP_P:
        b_key = _ordered_key(b_x)                                                              # [BV]
        b_lo = tl.min(tl.where(m_v, b_key, KEY_MAX), axis=0)
        b_hi = tl.max(tl.where(m_v, b_key, KEY_MIN), axis=0)
    if USE_TOP_K:
        # largest K with #{key >= K} >= top_k, in [min key, max key]
        lo, hi = b_lo, b_hi + 1
        for _ in range(33):
            mid = lo + (hi - lo) // 2
            ok = tl.sum((m_v & (b_key >= mid)).to(tl.int32), axis=0) >= top_k
            lo, hi = tl.where(ok, mid, lo), tl.where(ok, hi, mid)
        b_x = tl.where(b_key < lo, float("-inf"), b_x)
    if USE_TOP_P:
        b_e = tl.exp(b_x - tl.max(b_x, axis=0))
        b_p = tl.math.div_rn(b_e, tl.sum(b_e, axis=0))
        # smallest K with mass{key > K} <= top_p, in (min key - 1, max key]
        lo, hi = b_lo - 1, b_hi
        for _ in range(33):
            mid = lo + (hi - lo) // 2
            ok = tl.sum(tl.where(b_key > mid, b_p, 0.0), axis=0) <= top_p
            lo, hi = tl.where(ok, lo, mid), tl.where(ok, mid, hi)
        b_x = tl.where(b_key < hi, float("-inf"), b_x)
    b_keep = b_x > float("-inf")
    b_e = tl.exp(b_x - tl.max(b_x, axis=0))
    b_p = tl.math.div_rn(b_e, tl.sum(b_e, axis=0))
    b_noise = tl.load(noise + i_n * stride_e + o_v, mask=m_v, other=1.0)
    b_race = tl.where(b_keep, tl.math.div_rn(b_p, b_noise), -1.0)        # filtered tokens can never win
    tl.store(out + i_n, tl.argmax(b_race, axis=0).to(tl.int64))
