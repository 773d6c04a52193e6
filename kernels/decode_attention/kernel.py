"""Triton kernels for cached decoding attention (split-K, flash-decoding style).

One program handles one (sample, head), a tile of queries and one split of the visible keys.
It streams the split's keys in tiles of ``BLOCK_N`` with an online softmax in fp32 (scores in the
log2 domain, the scale folded into the query) and either writes the normalised output (one split)
or its partial statistics ``(max, sum, acc)`` for ``combine_splits_kernel``.

Layout codes (``LAYOUT``) and the keys query ``pos + r`` sees (``b = pos // C``, ``s0 = pos % C``):

====  ============  ===========================================  ==============================
code  pattern       keys (count)                                 key address
====  ============  ===========================================  ==============================
0     block         ``s0 + r + 1``                               ``[n, j, h]``
1     prev_block    ``C`` (0 in block 0)                         ``[n, (b - 1) % 2, j, h]``
2     transpose     ``b + 1``                                    ``[n, s0 + r, j, h]``
3     dense         ``pos + r + 1``                              ``[n, j, h]``
4     prime         ``min(pos + r + 1, P)``                      ``[n, j, h]``
5     cross         ``S``                                        ``[n, j, h]``
====  ============  ===========================================  ==============================

Every count is clamped to the cache's capacity along the key axis (``n_keys``), so a position
read from device memory can never address outside the cache.
"""
import triton
import triton.language as tl

LAYOUTS = {"block": 0, "prev_block": 1, "transpose": 2, "dense": 3, "prime": 4, "cross": 5}


@triton.jit
def _key_count(r, pos, b, s0, block_len, n_keys, LAYOUT: tl.constexpr):
    """Keys visible to the query at ``pos + r`` (``r``: scalar or [BLOCK_T]), clamped to capacity."""
    if LAYOUT == 0:
        cnt = s0 + r + 1
    elif LAYOUT == 1:
        cnt = tl.where(b > 0, block_len, 0) + r * 0
    elif LAYOUT == 2:
        # a query past the block's last row would cross a block boundary: it sees nothing
        cnt = tl.where(s0 + r < block_len, b + 1, 0)
    elif LAYOUT == 3:
        cnt = pos + r + 1
    elif LAYOUT == 4:
        cnt = pos + r + 1
    else:
        cnt = n_keys + r * 0
    return tl.minimum(cnt, n_keys)


@triton.jit
def _row_offset(r, b, s0, stride_r, LAYOUT: tl.constexpr):
    """Offset of the key sequence inside one (sample, head): the ring slot or the column."""
    if LAYOUT == 1:
        off = ((b + 1) % 2).to(tl.int64) * stride_r
    elif LAYOUT == 2:
        off = (s0 + r).to(tl.int64) * stride_r
    else:
        off = tl.zeros([], dtype=tl.int64)
    return off


@triton.jit(do_not_specialize=["pos", "T", "split_len"])
def decode_attention_kernel(
    q, k, v, o, m_part, l_part, acc_part, pos_ptr, pos,
    stride_qn, stride_qt, stride_qh, stride_qd,
    stride_kn, stride_kr, stride_kj, stride_kh, stride_kd,
    stride_vn, stride_vr, stride_vj, stride_vh, stride_vd,
    stride_on, stride_ot, stride_oh, stride_od,
    T, H, D, block_len, n_keys, split_len, n_splits, scale_log2,
    LAYOUT: tl.constexpr, POS_FROM_PTR: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(N * H, cdiv(T, BLOCK_T), n_splits)``. ``BLOCK_T == 1``: one query, multiply-reduce
    (decode); ``BLOCK_T >= 16``: a query tile through ``tl.dot`` (priming chunks, not transpose)."""
    i_nh, i_t, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = (i_nh // H).to(tl.int64), (i_nh % H).to(tl.int64)
    if POS_FROM_PTR:
        pos = tl.load(pos_ptr).to(tl.int32)
    b = pos // block_len
    s0 = pos - b * block_len
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    lo = i_s * split_len

    if BLOCK_T == 1:
        r = i_t
        cnt = _key_count(r, pos, b, s0, block_len, n_keys, LAYOUT)
        hi = tl.minimum(lo + split_len, cnt)
        p_k = k + i_n * stride_kn + i_h * stride_kh + _row_offset(r, b, s0, stride_kr, LAYOUT)
        p_v = v + i_n * stride_vn + i_h * stride_vh + _row_offset(r, b, s0, stride_vr, LAYOUT)
        b_q = tl.load(q + i_n * stride_qn + r * stride_qt + i_h * stride_qh + o_d * stride_qd,
                      mask=m_d, other=0.0).to(tl.float32) * scale_log2                     # [BD]
        b_m = tl.full([], float("-inf"), tl.float32)
        b_l = tl.zeros([], dtype=tl.float32)
        b_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            o_j = start + tl.arange(0, BLOCK_N)
            m_j = o_j < hi
            m_kv = m_j[:, None] & m_d[None, :]
            b_k = tl.load(p_k + o_j[:, None].to(tl.int64) * stride_kj + o_d[None, :] * stride_kd,
                          mask=m_kv, other=0.0).to(tl.float32)                              # [BN, BD]
            b_s = tl.where(m_j, tl.sum(b_k * b_q[None, :], axis=1), float("-inf"))        # [BN]
            b_m_new = tl.maximum(b_m, tl.max(b_s, axis=0))
            b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
            b_p = tl.exp2(b_s - b_m_safe)
            b_alpha = tl.exp2(b_m - b_m_safe)
            b_v = tl.load(p_v + o_j[:, None].to(tl.int64) * stride_vj + o_d[None, :] * stride_vd,
                          mask=m_kv, other=0.0).to(tl.float32)                              # [BN, BD]
            b_l = b_l * b_alpha + tl.sum(b_p, axis=0)
            b_acc = b_acc * b_alpha + tl.sum(b_p[:, None] * b_v, axis=0)
            b_m = b_m_new
        i_row = (i_n * H + i_h) * T + r           # row of the [N, H, T] partial buffers
        if SPLIT:
            tl.store(m_part + i_row * n_splits + i_s, b_m)
            tl.store(l_part + i_row * n_splits + i_s, b_l)
            tl.store(acc_part + (i_row * n_splits + i_s) * D + o_d, b_acc, mask=m_d)
        else:
            b_o = tl.where(b_l > 0, b_acc / tl.where(b_l > 0, b_l, 1.0), 0.0)
            tl.store(o + i_n * stride_on + r * stride_ot + i_h * stride_oh + o_d * stride_od,
                     b_o.to(o.dtype.element_ty), mask=m_d)
    else:
        o_r = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        m_r = o_r < T
        cnt = tl.where(m_r, _key_count(o_r, pos, b, s0, block_len, n_keys, LAYOUT), 0)    # [BT]
        hi = tl.minimum(lo + split_len, tl.max(cnt, axis=0))
        p_k = k + i_n * stride_kn + i_h * stride_kh + _row_offset(0, b, s0, stride_kr, LAYOUT)
        p_v = v + i_n * stride_vn + i_h * stride_vh + _row_offset(0, b, s0, stride_vr, LAYOUT)
        p_q = q + i_n * stride_qn + o_r[:, None] * stride_qt + i_h * stride_qh + o_d[None, :] * stride_qd
        b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)                   # [BT, BD]
        b_m = tl.full([BLOCK_T], float("-inf"), tl.float32)
        b_l = tl.zeros([BLOCK_T], dtype=tl.float32)
        b_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            o_j = start + tl.arange(0, BLOCK_N)
            m_j = o_j < hi
            m_kv = m_j[:, None] & m_d[None, :]
            b_k = tl.load(p_k + o_j[:, None].to(tl.int64) * stride_kj + o_d[None, :] * stride_kd,
                          mask=m_kv, other=0.0)                                             # [BN, BD]
            b_v = tl.load(p_v + o_j[:, None].to(tl.int64) * stride_vj + o_d[None, :] * stride_vd,
                          mask=m_kv, other=0.0)                                             # [BN, BD]
            if IEEE:
                b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
            else:
                b_s = tl.dot(b_q, tl.trans(b_k))
            b_s = tl.where(o_j[None, :] < cnt[:, None], b_s * scale_log2, float("-inf"))  # [BT, BN]
            b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
            b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
            b_p = tl.exp2(b_s - b_m_safe[:, None])
            b_alpha = tl.exp2(b_m - b_m_safe)
            b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
            if IEEE:
                b_pv = tl.dot(b_p, b_v.to(tl.float32), input_precision="ieee")
            else:
                b_pv = tl.dot(b_p.to(b_v.dtype), b_v)
            b_acc = b_acc * b_alpha[:, None] + b_pv
            b_m = b_m_new
        i_row = (i_n * H + i_h) * T + o_r                                                   # [BT]
        if SPLIT:
            tl.store(m_part + i_row * n_splits + i_s, b_m, mask=m_r)
            tl.store(l_part + i_row * n_splits + i_s, b_l, mask=m_r)
            tl.store(acc_part + (i_row[:, None] * n_splits + i_s) * D + o_d[None, :], b_acc,
                     mask=m_r[:, None] & m_d[None, :])
        else:
            b_o = tl.where(b_l[:, None] > 0, b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None], 0.0)
            p_o = o + i_n * stride_on + o_r[:, None] * stride_ot + i_h * stride_oh + o_d[None, :] * stride_od
            tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])


@triton.jit(do_not_specialize=["T"])
def combine_splits_kernel(
    o, m_part, l_part, acc_part,
    stride_on, stride_ot, stride_oh, stride_od,
    T, H, D, n_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(N * H * T, cdiv(D, BLOCK_D))``: merge the ``n_splits`` partial softmaxes of one
    query row (rescale each by ``2^(m_s - max m)``) into the output ``[N, T, H, D]``."""
    i_row, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_t = i_row % T
    i_h = (i_row // T) % H
    i_n = i_row // (T * H)
    o_s = tl.arange(0, BLOCK_S)
    m_s = o_s < n_splits
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_m = tl.load(m_part + i_row * n_splits + o_s, mask=m_s, other=float("-inf"))          # [BS]
    b_l = tl.load(l_part + i_row * n_splits + o_s, mask=m_s, other=0.0)                    # [BS]
    b_mx = tl.max(b_m, axis=0)
    b_w = tl.exp2(b_m - tl.where(b_mx == float("-inf"), 0.0, b_mx))                       # empty splits: 0
    b_den = tl.sum(b_w * b_l, axis=0)
    b_acc = tl.load(acc_part + (i_row * n_splits + o_s[:, None]) * D + o_d[None, :],
                    mask=m_s[:, None] & m_d[None, :], other=0.0)                            # [BS, BD]
    b_num = tl.sum(b_w[:, None] * b_acc, axis=0)
    b_o = tl.where(b_den > 0, b_num / tl.where(b_den > 0, b_den, 1.0), 0.0)
    tl.store(o + i_n * stride_on + i_t * stride_ot + i_h * stride_oh + o_d * stride_od,
             b_o.to(o.dtype.element_ty), mask=m_d)
