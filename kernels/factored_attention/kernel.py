"""Triton kernels for factored sparse attention (forward, backward preprocess, dq, dk/dv).

Layout: q ``[B, T, H, D]`` and k, v ``[B, S, H, D]`` with arbitrary batch/time/head strides and a
unit feature stride; o, do, dq, dk and dv are contiguous ``[B, T|S, H, D]``; the row statistics
(lse, delta) are contiguous ``[B, H, T]`` fp32.

Every program owns one tile of positions that are ``STEP`` apart: ``STEP == 1`` for contiguous
rows, ``STEP == C`` for one column of a transpose layer (rows ``c, c + C, c + 2C, ...``). The
visible-key rule and the range of key (or query) tiles a program visits come from ``PATTERN``:

==========  =========  ============================================================
``PATTERN`` name       query ``i`` reads key ``j`` when
==========  =========  ============================================================
0           dense      ``j < N_KEYS`` (dense, prime, cross), causal ``j <= i``
1           block      ``j // C == i // C`` and ``j < T``, causal ``j <= i``
2           transpose  ``j % C == i % C`` and ``j < T``, causal ``j <= i``
3           prev_block ``j // C == i // C - 1`` (never causal)
==========  =========  ============================================================

Rows that see no key (block 0 of ``prev_block``, ``N_KEYS == 0``) output exactly 0 and get zero
gradients. Scores are ``scale * q.k`` accumulated in fp32; the softmax runs in base 2 with the
scale folded into ``qk_scale = scale * log2(e)``; the stored log-sum-exp is in natural-log units.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_positions(i_t, T, C, BT: tl.constexpr, PATTERN: tl.constexpr):
    """Positions of the program's tile and its row numbers inside its column (transpose) or sequence.

    Returns ``(o_i [BT] int32 positions, o_r [BT] int32 row numbers, c column start, n_r rows in range)``.
    """
    if PATTERN == 2:
        nb = tl.cdiv(T, C)
        n_tiles = tl.cdiv(nb, BT)
        i_c = i_t // n_tiles
        o_r = (i_t % n_tiles) * BT + tl.arange(0, BT)
        n_r = tl.cdiv(T - i_c, C)  # rows of column i_c that are real positions
        o_i = i_c + o_r * C
    else:
        i_c = 0
        o_r = i_t * BT + tl.arange(0, BT)
        n_r = T
        o_i = o_r
    return o_i, o_r, i_c, n_r


@triton.jit
def _visible(o_i, o_j, C, N_KEYS, CAUSAL: tl.constexpr, PATTERN: tl.constexpr):
    """[BT, BS] bool: query position ``o_i`` [BT] may read key position ``o_j`` [BS].

    Keys at or past ``T`` are excluded by the callers' load masks; ``N_KEYS`` matters for the
    dk/dv kernel, which loads whole key tiles up to ``S``."""
    if PATTERN == 0:
        m_s = (o_j < N_KEYS)[None, :] & (o_i >= 0)[:, None]
    elif PATTERN == 1:
        m_s = (o_j // C)[None, :] == (o_i // C)[:, None]
    elif PATTERN == 2:
        m_s = (o_j >= 0)[None, :] & (o_i >= 0)[:, None]  # same column by construction
    else:
        m_s = (o_j // C)[None, :] == (o_i // C - 1)[:, None]
    if CAUSAL:
        if PATTERN != 3:
            m_s = m_s & (o_j[None, :] <= o_i[:, None])
    return m_s


@triton.jit
def _key_range(i_first, i_last, r_first, r_last, n_r, C, T, N_KEYS,
               CAUSAL: tl.constexpr, PATTERN: tl.constexpr):
    """Key rows ``[lo, hi)`` that queries ``i_first..i_last`` (rows ``r_first..r_last``) may read.

    Rows are positions, except for transpose where they index the query's own column.
    """
    if PATTERN == 0:
        lo = 0
        hi = N_KEYS
        if CAUSAL:
            hi = tl.minimum(hi, i_last + 1)
    elif PATTERN == 1:
        lo = (i_first // C) * C
        hi = tl.minimum(T, (i_last // C + 1) * C)
        if CAUSAL:
            hi = tl.minimum(hi, i_last + 1)
    elif PATTERN == 2:
        lo = 0
        hi = n_r
        if CAUSAL:
            hi = tl.minimum(hi, r_last + 1)
    else:
        lo = tl.maximum(i_first // C - 1, 0) * C
        hi = (i_last // C) * C
    return lo, hi


@triton.jit
def _query_range(j_first, j_last, r_first, r_last, n_r, C, T, N_KEYS,
                 CAUSAL: tl.constexpr, PATTERN: tl.constexpr):
    """Query rows ``[lo, hi)`` that may read keys ``j_first..j_last`` (rows ``r_first..r_last``)."""
    if PATTERN == 0:
        lo = 0
        if CAUSAL:
            lo = j_first
        hi = tl.where(j_first < N_KEYS, T, lo)  # keys past the visible ones get zero gradients
    elif PATTERN == 1:
        lo = (j_first // C) * C
        if CAUSAL:
            lo = j_first
        hi = tl.minimum(T, (j_last // C + 1) * C)
    elif PATTERN == 2:
        lo = 0
        if CAUSAL:
            lo = r_first
        hi = n_r
    else:
        lo = (j_first // C + 1) * C
        hi = tl.minimum(T, (j_last // C + 2) * C)
    return lo, hi


@triton.jit(do_not_specialize=["T", "S", "N_KEYS"])
def attn_fwd_kernel(
    q, k, v, o, lse,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
    T, S, N_KEYS, C, qk_scale,
    H: tl.constexpr, D: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, PATTERN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One query tile: online softmax over the visible key tiles; writes o [BT, D] and lse [BT]."""
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b64 = i_b.to(tl.int64)
    i_h64 = i_h.to(tl.int64)

    o_i, o_r, i_c, n_r = _tile_positions(i_t, T, C, BT, PATTERN)
    m_i = o_r < n_r
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D

    p_q = q + i_b64 * s_qb + i_h64 * s_qh + o_i.to(tl.int64)[:, None] * s_qt + o_d[None, :]
    b_q = tl.load(p_q, mask=m_i[:, None] & m_d[None, :], other=0.)  # [BT, BLOCK_D]

    r_first = tl.min(tl.where(m_i, o_r, n_r))
    r_last = tl.max(tl.where(m_i, o_r, 0))
    i_first = tl.min(tl.where(m_i, o_i, T))
    i_last = tl.max(tl.where(m_i, o_i, 0))
    lo, hi = _key_range(i_first, i_last, r_first, r_last, n_r, C, T, N_KEYS, CAUSAL, PATTERN)
    step = C if PATTERN == 2 else 1

    b_m = tl.full([BT], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BT], dtype=tl.float32)
    b_acc = tl.zeros([BT, BLOCK_D], dtype=tl.float32)
    k_base = k + i_b64 * s_kb + i_h64 * s_kh
    v_base = v + i_b64 * s_vb + i_h64 * s_vh
    for r0 in range(lo, hi, BS):
        o_s = r0 + tl.arange(0, BS)
        o_j = i_c + o_s * step                                                      # [BS] key positions
        m_j = o_s < hi
        o_j64 = o_j.to(tl.int64)[:, None]
        b_k = tl.load(k_base + o_j64 * s_kt + o_d[None, :], mask=m_j[:, None] & m_d[None, :], other=0.)
        b_v = tl.load(v_base + o_j64 * s_vt + o_d[None, :], mask=m_j[:, None] & m_d[None, :], other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=INPUT_PRECISION) * qk_scale   # [BT, BS]
        m_s = _visible(o_i, o_j, C, N_KEYS, CAUSAL, PATTERN) & m_j[None, :]
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_m_safe = tl.where(b_m_new == float("-inf"), 0., b_m_new)  # rows with nothing visible yet
        b_p = tl.exp2(b_s - b_m_safe[:, None])                      # [BT, BS]
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=INPUT_PRECISION)
        b_m = b_m_new

    m_seen = b_l > 0
    b_l = tl.where(m_seen, b_l, 1.)
    b_o = b_acc / b_l[:, None]                                                       # [BT, BLOCK_D]
    b_lse = tl.where(m_seen, (b_m + tl.log2(b_l)) * 0.6931471805599453, float("-inf"))  # * ln 2

    p_o = o + (i_b64 * T + o_i.to(tl.int64))[:, None] * (H * D) + i_h64 * D + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_i[:, None] & m_d[None, :])
    tl.store(lse + (i_b64 * H + i_h64) * T + o_i, b_lse, mask=m_i)


@triton.jit(do_not_specialize=["T"])
def attn_bwd_preprocess_kernel(o, do, delta, T, H: tl.constexpr, D: tl.constexpr,
                               BT: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta [B, H, T] = rowsum(o * do) in fp32; o and do contiguous [B, T, H, D]."""
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_i = i_t * BT + tl.arange(0, BT)
    o_d = tl.arange(0, BLOCK_D)
    m_i = o_i < T
    m = m_i[:, None] & (o_d < D)[None, :]
    o_x = (i_b.to(tl.int64) * T + o_i.to(tl.int64))[:, None] * (H * D) + i_h * D + o_d[None, :]
    b_o = tl.load(o + o_x, mask=m, other=0.).to(tl.float32)     # [BT, BLOCK_D]
    b_do = tl.load(do + o_x, mask=m, other=0.).to(tl.float32)   # [BT, BLOCK_D]
    tl.store(delta + (i_b.to(tl.int64) * H + i_h) * T + o_i, tl.sum(b_o * b_do, 1), mask=m_i)


@triton.jit(do_not_specialize=["T", "S", "N_KEYS"])
def attn_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
    T, S, N_KEYS, C, qk_scale, scale,
    H: tl.constexpr, D: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, PATTERN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One query tile: dq [BT, D] = scale * sum over visible keys of p * (dp - delta) k."""
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b64 = i_b.to(tl.int64)
    i_h64 = i_h.to(tl.int64)

    o_i, o_r, i_c, n_r = _tile_positions(i_t, T, C, BT, PATTERN)
    m_i = o_r < n_r
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_id = m_i[:, None] & m_d[None, :]

    b_q = tl.load(q + i_b64 * s_qb + i_h64 * s_qh + o_i.to(tl.int64)[:, None] * s_qt + o_d[None, :],
                  mask=m_id, other=0.)                                              # [BT, BLOCK_D]
    o_x = (i_b64 * T + o_i.to(tl.int64))[:, None] * (H * D) + i_h64 * D + o_d[None, :]
    b_do = tl.load(do + o_x, mask=m_id, other=0.)                                    # [BT, BLOCK_D]
    o_stat = (i_b64 * H + i_h64) * T + o_i
    b_lse2 = tl.load(lse + o_stat, mask=m_i, other=0.) * 1.4426950408889634           # [BT] log2 e
    b_delta = tl.load(delta + o_stat, mask=m_i, other=0.)                            # [BT]

    r_first = tl.min(tl.where(m_i, o_r, n_r))
    r_last = tl.max(tl.where(m_i, o_r, 0))
    i_first = tl.min(tl.where(m_i, o_i, T))
    i_last = tl.max(tl.where(m_i, o_i, 0))
    lo, hi = _key_range(i_first, i_last, r_first, r_last, n_r, C, T, N_KEYS, CAUSAL, PATTERN)
    step = C if PATTERN == 2 else 1

    b_dq = tl.zeros([BT, BLOCK_D], dtype=tl.float32)
    k_base = k + i_b64 * s_kb + i_h64 * s_kh
    v_base = v + i_b64 * s_vb + i_h64 * s_vh
    for r0 in range(lo, hi, BS):
        o_s = r0 + tl.arange(0, BS)
        o_j = i_c + o_s * step
        m_j = o_s < hi
        o_j64 = o_j.to(tl.int64)[:, None]
        b_k = tl.load(k_base + o_j64 * s_kt + o_d[None, :], mask=m_j[:, None] & m_d[None, :], other=0.)
        b_v = tl.load(v_base + o_j64 * s_vt + o_d[None, :], mask=m_j[:, None] & m_d[None, :], other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=INPUT_PRECISION) * qk_scale   # [BT, BS]
        m_s = _visible(o_i, o_j, C, N_KEYS, CAUSAL, PATTERN) & m_j[None, :] & m_i[:, None]
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse2[:, None]), 0.)                         # [BT, BS]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=INPUT_PRECISION)             # [BT, BS]
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=INPUT_PRECISION)
    tl.store(dq + o_x, (b_dq * scale).to(dq.dtype.element_ty), mask=m_id)


@triton.jit(do_not_specialize=["T", "S", "N_KEYS"])
def attn_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
    T, S, N_KEYS, C, qk_scale, scale,
    H: tl.constexpr, D: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, PATTERN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One key tile: dv [BS, D] = sum_i p_ij do_i and dk [BS, D] = scale * sum_i ds_ij q_i over the
    queries that may read it; every key row in the tile is written (zeros where nothing reads it)."""
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b64 = i_b.to(tl.int64)
    i_h64 = i_h.to(tl.int64)

    if PATTERN == 2:
        o_j, o_s, i_c, n_s = _tile_positions(i_t, T, C, BS, PATTERN)
        step = C
    else:
        o_j = i_t * BS + tl.arange(0, BS)
        o_s = o_j
        i_c = 0
        n_s = S
        step = 1
    m_j = o_s < n_s
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_jd = m_j[:, None] & m_d[None, :]
    # keys past N_KEYS (prime) are never read: their gradient rows are written as zeros
    m_load = m_jd & (o_j < N_KEYS)[:, None]
    o_j64 = o_j.to(tl.int64)[:, None]
    b_k = tl.load(k + i_b64 * s_kb + i_h64 * s_kh + o_j64 * s_kt + o_d[None, :], mask=m_load, other=0.)
    b_v = tl.load(v + i_b64 * s_vb + i_h64 * s_vh + o_j64 * s_vt + o_d[None, :], mask=m_load, other=0.)

    s_first = tl.min(tl.where(m_j, o_s, n_s))
    s_last = tl.max(tl.where(m_j, o_s, 0))
    j_first = tl.min(tl.where(m_j, o_j, S))
    j_last = tl.max(tl.where(m_j, o_j, 0))
    lo, hi = _query_range(j_first, j_last, s_first, s_last, n_s, C, T, N_KEYS, CAUSAL, PATTERN)

    b_dk = tl.zeros([BS, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BS, BLOCK_D], dtype=tl.float32)
    for r0 in range(lo, hi, BT):
        o_r = r0 + tl.arange(0, BT)
        o_i = i_c + o_r * step                                                      # [BT] query positions
        m_i = o_r < hi
        m_id = m_i[:, None] & m_d[None, :]
        b_q = tl.load(q + i_b64 * s_qb + i_h64 * s_qh + o_i.to(tl.int64)[:, None] * s_qt + o_d[None, :],
                      mask=m_id, other=0.)                                          # [BT, BLOCK_D]
        o_x = (i_b64 * T + o_i.to(tl.int64))[:, None] * (H * D) + i_h64 * D + o_d[None, :]
        b_do = tl.load(do + o_x, mask=m_id, other=0.)                                # [BT, BLOCK_D]
        o_stat = (i_b64 * H + i_h64) * T + o_i
        b_lse2 = tl.load(lse + o_stat, mask=m_i, other=0.) * 1.4426950408889634       # [BT] log2 e
        b_delta = tl.load(delta + o_stat, mask=m_i, other=0.)                        # [BT]

        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=INPUT_PRECISION) * qk_scale  # [BS, BT]
        m_st = tl.trans(_visible(o_i, o_j, C, N_KEYS, CAUSAL, PATTERN)) & m_j[:, None] & m_i[None, :]
        b_pt = tl.where(m_st, tl.exp2(b_st - b_lse2[None, :]), 0.)                      # [BS, BT]
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=INPUT_PRECISION)            # [BS, BT]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=INPUT_PRECISION)
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=INPUT_PRECISION)

    o_y = (i_b64 * S + o_j.to(tl.int64))[:, None] * (H * D) + i_h64 * D + o_d[None, :]
    tl.store(dk + o_y, (b_dk * scale).to(dk.dtype.element_ty), mask=m_jd)
    tl.store(dv + o_y, b_dv.to(dv.dtype.element_ty), mask=m_jd)
