"""Static key/value caches for cached decoding (filled in by the sampler)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .attention import layer_patterns
from .config import PriorConfig


def cache_positions(pattern: str, config: PriorConfig, seq_len: int | None = None) -> int:
    """Key/value slots one layer keeps per sample: one block for block layers, two for
    previous-block layers (a ring), the lyric-visible keys for prime layers, the encoder length
    for cross layers and the whole context for dense and transpose layers."""
    L = config.seq_len if seq_len is None else seq_len
    C = config.block_len
    return {"block": C, "prev_block": 2 * C, "transpose": L, "dense": L, "prime": config.prime_len or 0,
            "cross": config.encoder_len, "summary": config.blocks}[pattern]


def cache_bytes_per_sample(config: PriorConfig, dtype: torch.dtype) -> int:
    """Bytes of keys + values one sample's window needs across all layers."""
    item = torch.empty((), dtype=dtype).element_size()
    slots = sum(cache_positions(p, config) for p in layer_patterns(config.attn_order, config.depth))
    return 2 * slots * config.n_state * item


def slot_index(pattern: str, pos, block_len: int, blocks: int):
    """Index of position ``pos``'s key/value among a layer's slots, flattened in the layout's
    order (``block``: ``[C]``, ``prev_block``: ``[2, C]``, ``transpose``: ``[C, blocks]``, ``dense``
    and ``prime``: ``[L]``). ``pos`` is an int or a long tensor on the device (the arithmetic is the
    same); prime layers keep only positions below ``prime_len``, which the caller checks."""
    b, s = pos // block_len, pos % block_len
    if pattern == "block":
        return s
    if pattern == "prev_block":
        return (b % 2) * block_len + s
    if pattern == "transpose":
        return s * blocks + b
    if pattern in ("dense", "prime"):
        return pos
    raise ValueError(f"{pattern!r} layers keep no per-position slot")


class RowSlots(NamedTuple):
    """Per-row cache writes of one call (``KVCache.row_slots``), each ``(N, T, 2 H D)``: the slot
    ``index`` and the chunk position ``source`` each position's key/value is stored from;
    ``keep_none: (N, 1, 1)`` (prime layers, else None) marks rows that store nothing."""
    index: torch.Tensor
    source: torch.Tensor
    keep_none: torch.Tensor | None


class KVCache:
    """Per-layer key/value buffers of one prior for a batch, allocated once and reused across
    windows. Layouts are those of ``kernels.decode_attention`` (transpose layers store
    ``[N, C, blocks, H, D]`` so one step reads a contiguous column).

    A layer's keys and values share one buffer ``kv[layer]: [N, *slots, 2, H, D]``; ``k[layer]``
    and ``v[layer]`` are its two halves (strided views), ``flat[layer]: [N, slots, 2 H D]`` its
    slots in ``slot_index`` order. A position's key and value are then
    adjacent, so the one-token step writes both with a single ``addmm`` into ``slot(layer, pos)``."""

    def __init__(self, config: PriorConfig, batch: int, dtype: torch.dtype, device: torch.device | str):
        self.config, self.batch = config, batch
        self.patterns = layer_patterns(config.attn_order, config.depth)
        H, D, C = config.heads, config.head_dim, config.block_len
        nb = config.seq_len // C
        shapes = {"block": (C,), "prev_block": (2, C), "transpose": (C, nb), "dense": (config.seq_len,),
                  "prime": (config.prime_len or 0,), "cross": (config.encoder_len,)}
        self.kv, self.k, self.v, self.flat = [], [], [], []
        for p in self.patterns:
            if p not in shapes:
                raise ValueError(f"cached decoding does not support {p!r} attention layers")
            kv = torch.zeros((batch, *shapes[p], 2, H, D), dtype=dtype, device=device)
            self.kv.append(kv)
            self.flat.append(kv.view(batch, math.prod(shapes[p]), 2 * H * D))
            self.k.append(kv.select(-3, 0))
            self.v.append(kv.select(-3, 1))

    def narrow(self, n: int) -> "KVCache":
        """A view on the first ``n`` samples (no copy)."""
        if n > self.batch:
            raise ValueError(f"cache holds {self.batch} samples, asked for {n}")
        view = object.__new__(KVCache)
        view.config, view.batch, view.patterns = self.config, n, self.patterns
        view.kv = [kv[:n] for kv in self.kv]
        view.flat = [f[:n] for f in self.flat]
        view.k = [k[:n] for k in self.k]
        view.v = [v[:n] for v in self.v]
        return view

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
        """Store keys/values ``[N, T, H, D]`` of positions ``[pos, pos + T)`` (inside one block)."""
        p, C = self.patterns[layer], self.config.block_len
        T, b, s0 = k.shape[1], pos // C, pos % C
        kc, vc = self.k[layer], self.v[layer]
        if p == "block":
            kc[:, s0:s0 + T], vc[:, s0:s0 + T] = k, v
        elif p == "prev_block":
            kc[:, b % 2, s0:s0 + T], vc[:, b % 2, s0:s0 + T] = k, v
        elif p == "transpose":
            kc[:, s0:s0 + T, b], vc[:, s0:s0 + T, b] = k, v
        elif p == "dense":
            kc[:, pos:pos + T], vc[:, pos:pos + T] = k, v
        elif p == "prime":
            end = min(pos + T, kc.shape[1])
            if end > pos:
                kc[:, pos:end], vc[:, pos:end] = k[:, : end - pos], v[:, : end - pos]

    def write_projected(self, layer: int, pos: int, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
        """Store the keys/values ``addmm(b, h, w)`` (key columns, then value columns) of the rows
        ``h: (N * T, W)`` at positions ``[pos, pos + T)``. One position is projected straight into
        its slot; several are projected, then stored with ``write``."""
        N = self.kv[layer].shape[0]
        if h.shape[0] == N:
            slot = self.slot(layer, pos)
            if slot is not None:
                torch.addmm(b, h, w, out=slot)
            return
        H, D = self.config.heads, self.config.head_dim
        kv = torch.addmm(b, h, w).view(N, -1, 2, H, D)
        self.write(layer, kv[:, :, 0], kv[:, :, 1], pos)

    def row_slots(self, layer: int, starts: torch.Tensor, valid: torch.Tensor, T: int) -> RowSlots:
        """Where ``write_rows`` puts row ``n``'s positions ``starts[n] + t`` (``t < T``) in ``flat[layer]``,
        storing only ``t < valid[n]`` (``1 <= valid[n]``, those positions inside one block and the
        window); the same for every layer of a pattern in one call.

        Each padding position goes to the slot of its row's last stored position with that
        position's own values, so duplicate indices of one ``scatter_`` carry equal data. Prime
        layers keep only positions below ``prime_len``; a row with none there rewrites slot 0 with
        its current contents (``keep_none``)."""
        p, flat = self.patterns[layer], self.flat[layer]
        if p == "cross":
            raise ValueError("cross-attention layers take keys from the lyric encoder, not per position")
        width = flat.shape[2]
        stored = torch.minimum(valid, flat.shape[1] - starts) if p == "prime" else valid
        t = torch.minimum(torch.arange(T, device=starts.device), (stored.clamp(min=1) - 1)[:, None])   # (N, T)
        C = self.config.block_len
        slots = slot_index(p, starts[:, None] + t, C, self.config.seq_len // C)
        keep_none = None
        if p == "prime":
            keep_none = (stored < 1)[:, None, None]
            slots = slots.masked_fill(keep_none[..., 0], 0)
        return RowSlots(slots[..., None].expand(-1, -1, width), t[..., None].expand(-1, -1, width), keep_none)

    def write_rows(self, layer: int, kv: torch.Tensor, starts: torch.Tensor, valid: torch.Tensor,
                   slots: RowSlots | None = None) -> None:
        """Store keys/values ``kv: [N, T, 2 * H * D]`` (key then value per position, ``flat``'s slot
        layout; ``[N, T, 2, H, D]`` also taken) where row ``n``'s position ``t`` is ``starts[n] + t``;
        only ``t < valid[n]`` is stored, later positions (padding) touch no slot. ``starts`` and
        ``valid`` are ``(N,)`` long tensors on the cache's device, ``slots`` their ``row_slots``
        (computed here when None); nothing syncs with the host."""
        flat = self.flat[layer]
        N, T = kv.shape[:2]
        if slots is None:
            slots = self.row_slots(layer, starts, valid, T)
        if flat.shape[1] == 0:
            return
        src = kv.reshape(N, T, -1).gather(1, slots.source)
        if slots.keep_none is not None:
            src = torch.where(slots.keep_none, flat[:, :1], src)
        flat.scatter_(1, slots.index, src)

    def slot(self, layer: int, pos: int) -> torch.Tensor | None:
        """The key and value of position ``pos`` as one ``[N, 2 * H * D]`` view (key first), or None
        where the layer keeps no key for it (prime layers past the lyrics, cross layers)."""
        p, flat = self.patterns[layer], self.flat[layer]
        if p == "cross" or (p == "prime" and pos >= flat.shape[1]):
            return None
        C = self.config.block_len
        return flat[:, slot_index(p, pos, C, self.config.seq_len // C)]

    def set_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys/values ``[N, S, H, D]`` of a cross-attention layer, once per window."""
        self.k[layer].copy_(k)
        self.v[layer].copy_(v)
