"""Decode attention with the position on the device: static shapes, no host round trip.

``decode_attention_masked`` computes what ``reference.decode_attention_reference`` computes for a
single query per sample (``T == 1``), but reads each layer's whole static cache and masks it with
index comparisons against ``pos``, a 0-d integer tensor. Nothing depends on the position's value
on the host, so a step built from it can be recorded once as a CUDA graph (or compiled) and
replayed at every position.

Visible keys at position ``pos`` (block ``b = pos // C``, slot ``s = pos % C``):

=============  ====================  =================================================
pattern        cache shape           visible
=============  ====================  =================================================
``block``      ``[N, C, H, D]``      slots ``<= s``
``prev_block`` ``[N, 2, C, H, D]``   all of ring slot ``(b - 1) % 2``; output 0 when ``b == 0``
``transpose``  ``[N, C, nb, H, D]``  column ``s``, blocks ``<= b``
``dense``      ``[N, L, H, D]``      positions ``<= pos``
``prime``      ``[N, P, H, D]``      positions ``< min(pos + 1, prime_len)``
``cross``      ``[N, S, H, D]``      all
=============  ====================  =================================================
"""
from __future__ import annotations

import math

import torch

__all__ = ["decode_attention_masked", "MASKED_PATTERNS"]

MASKED_PATTERNS = ("block", "prev_block", "transpose", "dense", "prime", "cross")


def _attend_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """q: [N, 1, H, D]; k, v: [N, S, H, D]; allowed: [S] bool (or None: all) -> [N, 1, H, D].

    Half-precision inputs are attended in fp32 (softmax statistics), as the reference does."""
    dtype = q.dtype
    half = dtype in (torch.float16, torch.bfloat16)
    if half:
        q, k, v = q.float(), k.float(), v.float()
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)        # [N, H, *, D]
    s = torch.matmul(qh, kh.transpose(-1, -2)).mul_(scale)                      # [N, H, 1, S]
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    a = torch.matmul(torch.softmax(s, dim=-1), vh).transpose(1, 2)              # [N, 1, H, D]
    return a.to(dtype) if half else a


def _check(q, k_cache, v_cache, pattern, pos, prime_len):
    if pattern not in MASKED_PATTERNS:
        raise ValueError(f"cached decoding does not support the {pattern!r} pattern "
                         f"(supported: {', '.join(MASKED_PATTERNS)})")
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"q must be [N, 1, H, D] (one query per sample), got shape {tuple(q.shape)}")
    if not isinstance(pos, torch.Tensor) or pos.numel() != 1 or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError("pos must be a one-element int32/int64 tensor (the position stays on the device)")
    if pos.device != q.device:
        raise ValueError(f"pos is on {pos.device}, the queries on {q.device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if k_cache.shape[0] != q.shape[0] or tuple(k_cache.shape[-2:]) != tuple(q.shape[-2:]):
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not match queries {tuple(q.shape)}")
    if pattern == "prime" and prime_len is None:
        raise ValueError("prime attention needs prime_len")


def decode_attention_masked(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pattern: str,
                            pos: torch.Tensor, block_len: int, prime_len: int | None = None,
                            scale: float | None = None) -> torch.Tensor:
    """One query per sample at the device position ``pos`` against a layer's static cache.

    Args:
        q: ``[N, 1, H, D]``.
        k_cache, v_cache: the layer's cache in ``pattern``'s layout (see the module docstring);
            keys of ``pos`` itself must already be written.
        pattern: ``block`` | ``prev_block`` | ``transpose`` | ``dense`` | ``prime`` | ``cross``.
        pos: 0-d (or one-element) int64/int32 tensor on ``q``'s device: the query's position.
        block_len: ``C``.
        prime_len: keys visible to ``prime`` layers (required there).
        scale: score scale, ``1 / sqrt(D)`` by default.
    Returns:
        ``[N, 1, H, D]`` in ``q``'s dtype.
    """
    _check(q, k_cache, v_cache, pattern, pos, prime_len)
    D = q.shape[-1]
    C = block_len
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    pos = pos.reshape(())
    if pattern == "cross":
        return _attend_masked(q, k_cache, v_cache, None, scale)
    j = torch.arange(k_cache.shape[1], device=q.device)
    if pattern == "block":
        return _attend_masked(q, k_cache, v_cache, j <= pos % C, scale)
    if pattern in ("dense", "prime"):
        last = pos if pattern == "dense" else torch.clamp(pos, max=prime_len - 1)
        return _attend_masked(q, k_cache, v_cache, j <= last, scale)
    b = torch.div(pos, C, rounding_mode="floor")
    if pattern == "prev_block":
        ring = ((b + 1) % 2).reshape(1)                  # (b - 1) % 2 without a negative operand
        k = k_cache.index_select(1, ring).squeeze(1)     # [N, C, H, D]
        v = v_cache.index_select(1, ring).squeeze(1)
        a = _attend_masked(q, k, v, None, scale)
        return torch.where(b > 0, a, torch.zeros_like(a))
    # transpose: one column of the [N, C, nb, H, D] layout, the blocks up to this one
    col = (pos % C).reshape(1)
    k = k_cache.index_select(1, col).squeeze(1)          # [N, nb, H, D]
    v = v_cache.index_select(1, col).squeeze(1)
    jb = torch.arange(k.shape[1], device=q.device)
    return _attend_masked(q, k, v, jb <= b, scale)
