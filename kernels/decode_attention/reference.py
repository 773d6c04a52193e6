"""Cached decoding attention over the static cache layouts, in plain PyTorch: the one form every
host-position path uses (the one-token step, priming, speculative verify chunks) and the
reference the Triton kernel is tested against.

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

Each call is one ``scaled_dot_product_attention`` over the visible keys (views of the cache, no
copy for a single query); several queries of a causal pattern take an additive ``0 / -inf`` mask,
a view of one template per dtype and device (a float mask takes the CPU's fused kernel without
the conversion a boolean one costs).

``cached_attention_rows`` is the per-row form: row ``n`` of the batch has its own first position
``starts[n]`` (a tensor, read on the device, no host sync), so rows of one call may sit in
different blocks. It is one ``scaled_dot_product_attention`` with a boolean mask over the rows'
visible slots, on the CPU and on CUDA alike (a Triton per-row decode kernel is future work).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["RowKeys", "cached_attention", "cached_attention_rows", "decode_attention_reference", "row_keys"]

_BIAS: dict[tuple, torch.Tensor] = {}


def _causal_bias(T: int, first: int, like: torch.Tensor) -> torch.Tensor:
    """Additive mask ``(T, first + T)``: 0 where key ``j <= first + r`` for query row ``r``,
    ``-inf`` elsewhere.

    The template ``B`` is ``(rows, span)`` with ``B[r, j] = 0`` iff ``j <= span - rows + r``; the
    mask is its view ``B[:T, off:off + first + T]`` with ``off = span - rows - first``."""
    key = (like.dtype, like.device)
    b = _BIAS.get(key)
    if b is None or b.shape[0] < T or b.shape[1] - b.shape[0] < first:
        rows = max(16, T, 0 if b is None else b.shape[0])
        span = rows + max(first, 64, 0 if b is None else b.shape[1] - b.shape[0])
        keep = torch.ones(rows, span, dtype=torch.bool, device=like.device).tril_(span - rows)
        b = _BIAS[key] = torch.zeros(rows, span, dtype=like.dtype, device=like.device).masked_fill_(
            ~keep, float("-inf"))
    rows, span = b.shape
    off = span - rows - first
    return b[:T, off:off + first + T]


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pattern: str, pos: int,
                     block_len: int, prime_len: int | None = None,
                     scale: float | None = None) -> torch.Tensor | None:
    """Queries ``q: [N, T, H, D]`` at positions ``[pos, pos + T)`` (one block) against a layer's
    cache -> ``[N, T, H, D]``, or None where they see no key (the previous block of block 0:
    the attention output is exactly 0)."""
    N, T, H, D = q.shape
    C = block_len
    if T and (pos // C) != ((pos + T - 1) // C) and pattern != "cross":
        raise ValueError(f"queries [{pos}, {pos + T}) cross a block boundary (block length {C})")
    b, s0 = divmod(pos, C)
    if pattern == "transpose":   # each query its own column, blocks 0 .. b (all at or before it)
        if T == 1:
            k, v = k_cache[:, s0, :b + 1].transpose(1, 2), v_cache[:, s0, :b + 1].transpose(1, 2)
            return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, scale=scale).transpose(1, 2)
        # 4-D (N T, H, b + 1, D), as the CPU's fused kernel takes (a 5-D batch takes the unfused path)
        k, v = (c[:, s0:s0 + T, :b + 1].transpose(2, 3).reshape(N * T, H, b + 1, D) for c in (k_cache, v_cache))
        a = F.scaled_dot_product_attention(q.reshape(N * T, H, 1, D), k, v, scale=scale)
        return a.view(N, T, H, D)
    if pattern == "block":
        first, k, v = s0, k_cache[:, :s0 + T], v_cache[:, :s0 + T]
    elif pattern == "prev_block":
        if b == 0:
            return None
        first, k, v = None, k_cache[:, (b - 1) % 2], v_cache[:, (b - 1) % 2]
    elif pattern == "cross":
        first, k, v = None, k_cache, v_cache
    elif pattern in ("dense", "prime"):
        S = pos + T
        if pattern == "prime":
            if prime_len is None:
                raise ValueError("prime attention needs prime_len")
            S = min(S, prime_len)
        first, k, v = pos, k_cache[:, :S], v_cache[:, :S]
    else:
        raise ValueError(f"cached decoding does not support the {pattern!r} pattern")
    mask = None
    if first is not None and T > 1:      # query r sees keys j <= first + r (prime: cut at prime_len)
        mask = _causal_bias(T, first, q)[:, :k.shape[1]]
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       scale=scale)
    return a.transpose(1, 2)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pattern: str,
                               pos: int, block_len: int, prime_len: int | None = None,
                               scale: float | None = None) -> torch.Tensor:
    """``cached_attention`` with zeros where no key is visible: ``[N, T, H, D]`` in and out."""
    a = cached_attention(q, k_cache, v_cache, pattern, pos, block_len, prime_len, scale)
    return torch.zeros_like(q) if a is None else a


class RowKeys(NamedTuple):
    """Which keys each query of a per-row call reads (``row_keys``): transpose layers gather query
    ``(n, t)``'s column ``cols[n T + t]`` of row ``rows[n T + t]`` and keep blocks where ``mask``
    (``(N T, 1, 1, blocks)``); the others keep slots where ``mask`` (``(N, 1, T, slots)``, None: all).
    ``has_key: (N, T)``, or None where every query sees a key, marks queries with any."""
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    mask: torch.Tensor | None
    has_key: torch.Tensor | None


def row_keys(pattern: str, starts: torch.Tensor, T: int, block_len: int, k_cache: torch.Tensor) -> RowKeys:
    """The ``RowKeys`` of queries ``(n, t)`` at positions ``starts[n] + t`` against a layer's cache
    (only ``k_cache``'s shape and device are read): the same for every layer of a pattern in one
    call, so a caller may compute them once and pass them to ``cached_attention_rows``."""
    dev, C = k_cache.device, block_len
    N = starts.shape[0]
    pos = starts.to(dev).long()[:, None] + torch.arange(T, device=dev)   # (N, T)
    if pattern == "transpose":
        keep = torch.arange(k_cache.shape[2], device=dev) <= (pos // C).reshape(N * T, 1)
        rows = torch.arange(N, device=dev).repeat_interleave(T)
        return RowKeys(rows, (pos % C).reshape(N * T), keep[:, None, None], None)
    if pattern == "block":
        return RowKeys(None, None, (torch.arange(C, device=dev) <= (pos % C)[..., None])[:, None], None)
    if pattern == "prev_block":
        b = pos // C
        has_key = b >= 1
        ring = torch.arange(2 * C, device=dev) // C
        keep = (ring == (b[..., None] - 1) % 2) | ~has_key[..., None]     # keyless queries: any key, then 0
        return RowKeys(None, None, keep[:, None], has_key)
    if pattern == "cross":
        return RowKeys(None, None, None, None)
    if pattern in ("dense", "prime"):
        return RowKeys(None, None, (torch.arange(k_cache.shape[1], device=dev) <= pos[..., None])[:, None], None)
    raise ValueError(f"cached decoding does not support the {pattern!r} pattern")


def cached_attention_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pattern: str,
                          starts: torch.Tensor, block_len: int, prime_len: int | None = None,
                          scale: float | None = None, keys: RowKeys | None = None) -> torch.Tensor:
    """Queries ``q: [N, T, H, D]``, query ``(n, t)`` at position ``starts[n] + t``, against a layer's
    cache -> ``[N, T, H, D]``. ``starts`` is an ``(N,)`` integer tensor on the queries' device;
    ``keys`` is its ``row_keys`` (computed here when None).

    Each query sees the keys ``cached_attention`` gives one query at its position: ``block``: its
    block's slots up to its own; ``prev_block``: all of the previous block's ring slot (block 0:
    exactly 0); ``transpose``: its column ``position % C``, blocks up to its own; ``dense``: slots
    up to its position; ``prime``: those below ``prime_len`` too; ``cross``: every key. Positions
    may run past their block or the window (a caller's padding): their outputs are finite and
    meaningless."""
    N, T, H, D = q.shape
    if starts.dim() != 1 or starts.shape[0] != N or starts.dtype.is_floating_point or starts.dtype == torch.bool:
        raise ValueError(f"starts must be an integer tensor of shape ({N},), got {tuple(starts.shape)} "
                         f"{starts.dtype}")
    if pattern == "prime" and prime_len is None:
        raise ValueError("prime attention needs prime_len")
    if keys is None:
        keys = row_keys(pattern, starts, T, block_len, k_cache)
    if pattern == "transpose":   # each query gathers its own column [blocks, H, D]
        k, v = (c[keys.rows, keys.cols].transpose(1, 2) for c in (k_cache, v_cache))   # (N T, H, nb, D)
        a = F.scaled_dot_product_attention(q.reshape(N * T, H, 1, D), k, v, attn_mask=keys.mask, scale=scale)
        return a.view(N, T, H, D)
    k, v = (k_cache.flatten(1, 2), v_cache.flatten(1, 2)) if pattern == "prev_block" else (k_cache, v_cache)
    if k.shape[1] == 0:
        return torch.zeros_like(q)
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=keys.mask, scale=scale).transpose(1, 2)
    if keys.has_key is not None:
        a = torch.where(keys.has_key[..., None, None], a, torch.zeros((), dtype=a.dtype, device=a.device))
    return a
