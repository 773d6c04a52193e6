"""Plain-PyTorch factored attention: the definition the Triton kernels are tested against.

Query ``i`` may attend to key ``j`` (block length ``C``, ``b(i) = i // C``):

=============  =====================================================================
``dense``      every ``j`` (causal: ``j <= i``)
``block``      ``b(j) == b(i)`` (causal: ``j <= i``)
``transpose``  ``j % C == i % C`` (causal: ``j <= i``)
``prev_block`` ``b(j) == b(i) - 1``, all ``C`` keys; block 0 reads zero keys/values, so
               its output is exactly 0. It has no within-window order, so ``causal`` does
               not change it.
``summary``    a zero key plus the last position of every block but the final one
               (causal: only blocks that ended at or before ``i``)
``prime``      ``j < prime_len`` (causal: ``j <= i``)
``cross``      every key of a separate sequence (encoder outputs); never masked
=============  =====================================================================

Layout ``[B, T, H, D]`` in and out. Scores are ``q.k / sqrt(D)``; the softmax runs in fp32 for
half-precision inputs and in the input's precision otherwise. Sequences that are not a multiple
of ``C`` are padded internally; padded keys are never visible to real queries.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PATTERNS = ("dense", "block", "transpose", "prev_block", "summary", "prime", "cross")


def _softmax_attend(q, k, v, allowed, scale):
    """q: [..., Tq, D], k/v: [..., Tk, D], allowed: bool broadcastable to [..., Tq, Tk] or None."""
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    if allowed is not None:
        # A finite fill keeps rows that only padding reaches NaN-free (they are sliced away).
        s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.to(compute)).to(q.dtype)


def _to_blocks(x, C):
    """[B, H, T, D] -> [B, H, nb, C, D], zero-padding T up to whole blocks."""
    B, H, T, D = x.shape
    nb = -(-T // C)
    if nb * C != T:
        x = F.pad(x, (0, 0, 0, nb * C - T))
    return x.view(B, H, nb, C, D)


def factored_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str,
                                 block_len: int | None = None, causal: bool = True,
                                 prime_len: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention of one factored pattern.

    Args:
        q: ``[B, T, H, D]`` queries.
        k, v: ``[B, S, H, D]``; ``S == T`` except for ``cross`` (encoder length).
        pattern: one of ``PATTERNS``.
        block_len: ``C``, required for block / transpose / prev_block / summary.
        causal: keep only ``j <= i`` (see the module table).
        prime_len: visible keys for ``prime``.
        scale: defaults to ``1 / sqrt(D)``.
    Returns:
        ``[B, T, H, D]`` in q's dtype.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown attention pattern {pattern!r}; expected one of {PATTERNS}")
    B, T, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    dev = q.device

    if pattern == "cross":
        out = _softmax_attend(qh, kh, vh, None, scale)
    elif pattern in ("dense", "prime"):
        if pattern == "prime":
            if prime_len is None:
                raise ValueError("prime attention needs prime_len")
            kh, vh = kh[:, :, :prime_len], vh[:, :, :prime_len]
        allowed = None
        if causal:
            i = torch.arange(T, device=dev)[:, None]
            j = torch.arange(kh.shape[2], device=dev)[None, :]
            allowed = j <= i
        out = _softmax_attend(qh, kh, vh, allowed, scale)
    else:
        if not block_len:
            raise ValueError(f"{pattern} attention needs block_len")
        C = block_len
        qb, kb, vb = (_to_blocks(x, C) for x in (qh, kh, vh))  # [B, H, nb, C, D]
        nb = qb.shape[2]
        pos = torch.arange(nb * C, device=dev).view(nb, C)
        real = pos < T
        if pattern == "block":
            if causal:
                allowed = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
            else:
                allowed = real[:, None, :] if nb * C != T else None    # [nb, 1, C]
            out = _softmax_attend(qb, kb, vb, allowed, scale)
        elif pattern == "transpose":
            qt, kt, vt = (x.transpose(2, 3) for x in (qb, kb, vb))  # [B, H, C, nb, D]
            if causal:
                allowed = torch.ones(nb, nb, dtype=torch.bool, device=dev).tril()
            else:
                allowed = real.t()[:, None, :] if nb * C != T else None   # [C, 1, nb]
            out = _softmax_attend(qt, kt, vt, allowed, scale).transpose(2, 3)
        elif pattern == "prev_block":
            kp = F.pad(kb[:, :, :-1], (0, 0, 0, 0, 1, 0))      # block b reads block b-1, block 0 zeros
            vp = F.pad(vb[:, :, :-1], (0, 0, 0, 0, 1, 0))
            out = _softmax_attend(qb, kp, vp, None, scale)
        else:  # summary
            if T % C:
                raise ValueError("summary attention needs a whole number of blocks")
            ks = F.pad(kb[:, :, :-1, -1], (0, 0, 1, 0))        # [B, H, nb, D]: zero key + block ends
            vs = F.pad(vb[:, :, :-1, -1], (0, 0, 1, 0))
            allowed = None
            if causal:
                i = torch.arange(T, device=dev)[:, None]
                end = torch.arange(-1, nb - 1, device=dev) * C + C - 1   # -1 marks the zero key
                allowed = end[None, :] <= i
            return _softmax_attend(qh, ks, vs, allowed, scale).transpose(1, 2)
        out = out.reshape(B, H, nb * C, D)[:, :, :T]
    return out.transpose(1, 2)
