"""Cached decoding attention over the static cache layouts, in plain PyTorch.

A call covers queries at positions ``[pos, pos + T)`` that lie inside one block of length ``C``
(block ``b = pos // C``); their keys/values have already been written to the cache. Cache
layouts (``[N, ..., H, D]``) per pattern:

=============  ====================  ==================================================
pattern        cache shape           what the queries read
=============  ====================  ==================================================
``block``      ``[N, C, H, D]``      slots ``0 .. pos % C + r`` (this block so far)
``prev_block`` ``[N, 2, C, H, D]``   ring slot ``(b - 1) % 2``: all of the previous block;
                                     block 0 gives exactly 0
``transpose``  ``[N, C, nb, H, D]``  row ``(pos + r) % C``, blocks ``0 .. b``: contiguous
``dense``      ``[N, L, H, D]``      ``0 .. pos + r``
``prime``      ``[N, P, H, D]``      ``0 .. min(pos + r, P - 1)``
``cross``      ``[N, S, H, D]``      all encoder keys
=============  ====================  ==================================================
"""
from __future__ import annotations

import math

import torch


def _attend(q, k, v, allowed, scale):
    """q: [N, T, H, D]; k, v: [N, S, H, D]; allowed: [T, S] bool or None -> [N, T, H, D]."""
    dtype = q.dtype
    half = dtype in (torch.float16, torch.bfloat16)
    if half:   # softmax statistics in fp32
        q, k, v = q.float(), k.float(), v.float()
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [N, H, *, D]
    s = torch.matmul(qh, kh.transpose(-1, -2)).mul_(scale)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    a = torch.matmul(torch.softmax(s, dim=-1), vh).transpose(1, 2)
    return a.to(dtype) if half else a


def _causal(S: int, first: int, T: int, device) -> torch.Tensor | None:
    """[T, S] mask ``j <= first + r``; None for a single query (its keys are all visible)."""
    if T == 1:
        return None
    return torch.arange(S, device=device)[None, :] <= first + torch.arange(T, device=device)[:, None]


def single_query_keys(k_cache: torch.Tensor, v_cache: torch.Tensor, pattern: str, pos: int, block_len: int,
                      prime_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Keys and values ``[N, S, H, D]`` (views of the caches) that one query at ``pos`` reads, as in
    the table above; None where it reads nothing (the previous block of block 0, whose output is
    exactly 0)."""
    b, s0 = divmod(pos, block_len)
    if pattern == "block":
        return k_cache[:, : s0 + 1], v_cache[:, : s0 + 1]
    if pattern == "transpose":
        return k_cache[:, s0, : b + 1], v_cache[:, s0, : b + 1]
    if pattern == "prev_block":
        return None if b == 0 else (k_cache[:, (b - 1) % 2], v_cache[:, (b - 1) % 2])
    if pattern == "dense":
        return k_cache[:, : pos + 1], v_cache[:, : pos + 1]
    if pattern == "prime":
        if prime_len is None:
            raise ValueError("prime attention needs prime_len")
        S = min(pos + 1, prime_len)
        return k_cache[:, :S], v_cache[:, :S]
    if pattern == "cross":
        return k_cache, v_cache
    raise ValueError(f"cached decoding does not support the {pattern!r} pattern")


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pattern: str,
                               pos: int, block_len: int, prime_len: int | None = None,
                               scale: float | None = None) -> torch.Tensor:
    """Queries ``q: [N, T, H, D]`` at positions ``[pos, pos + T)`` (one block) -> ``[N, T, H, D]``."""
    N, T, H, D = q.shape
    C = block_len
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if T and (pos // C) != ((pos + T - 1) // C) and pattern != "cross":
        raise ValueError(f"queries [{pos}, {pos + T}) cross a block boundary (block length {C})")
    b, s0 = pos // C, pos % C
    if T == 1:
        kv = single_query_keys(k_cache, v_cache, pattern, pos, C, prime_len)
        return torch.zeros_like(q) if kv is None else _attend(q, kv[0], kv[1], None, scale)
    if pattern == "cross":
        return _attend(q, k_cache, v_cache, None, scale)
    if pattern == "block":
        S = s0 + T
        return _attend(q, k_cache[:, :S], v_cache[:, :S], _causal(S, s0, T, q.device), scale)
    if pattern == "prev_block":
        if b == 0:
            return torch.zeros_like(q)
        return _attend(q, k_cache[:, (b - 1) % 2], v_cache[:, (b - 1) % 2], None, scale)
    if pattern == "transpose":
        # Each query reads its own column: [N, T, b+1, H, D], all at or before it.
        k, v = k_cache[:, s0:s0 + T, : b + 1], v_cache[:, s0:s0 + T, : b + 1]
        compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        kh, vh = (x.to(compute).transpose(2, 3) for x in (k, v))          # [N, T, H, b+1, D]
        s = torch.matmul(q.to(compute).unsqueeze(-2), kh.transpose(-1, -2)) * scale   # [N, T, H, 1, b+1]
        return torch.matmul(torch.softmax(s, dim=-1), vh).squeeze(-2).to(q.dtype)
    if pattern in ("dense", "prime"):
        S = pos + T
        if pattern == "prime":
            if prime_len is None:
                raise ValueError("prime attention needs prime_len")
            S = min(S, prime_len)
        return _attend(q, k_cache[:, :S], v_cache[:, :S], _causal(S, pos, T, q.device), scale)
    raise ValueError(f"cached decoding does not support the {pattern!r} pattern")
