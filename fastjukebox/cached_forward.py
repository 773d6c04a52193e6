"""The prior's transformer over positions whose keys go into a static cache, with the position on
the host: one sampled token, priming known codes, a speculative verify chunk.

``CachedForward(model)(x, pos, cache)`` maps the inputs of positions ``[pos, pos + T)`` inside one
block (``x: (N, T, W)``, or ``(N, W)`` for one token) to the final activations of the same shape,
writing their keys/values into ``cache`` (a ``KVCache``). Each layer is
``block_forward.block_forward`` with this attention:

* the query projection is one ``addmm``, the key/value projection another, written straight
  into the position's cache slot for one token (``KVCache.slot``: key and value adjacent) and
  stored with ``KVCache.write`` for a chunk;
* on the CPU the queries attend to the keys they may see through
  ``kernels.decode_attention.reference.cached_attention`` (one ``scaled_dot_product_attention``
  on views of the cache); elsewhere through ``attention.attend_cached`` (the Triton kernel on
  CUDA).

``CachedForward(model).rows(x, starts, valid, cache)`` is the per-row form: row ``n``'s inputs
``x[n]: (T, W)`` are those of positions ``[starts[n], starts[n] + T)``, of which the first
``valid[n]`` (inside one block and the window) write their keys (``KVCache.write_rows``); the
rest are padding that write nothing. Its attention is
``kernels.decode_attention.reference.cached_attention_rows`` on every device.

A one-token step on a small model costs its number of tensor operations more than its
arithmetic; this path keeps that count per layer at what the arithmetic needs, and a chunk of T
positions costs as many operations as one token. Float64 parity with the teacher-forced forward
(to 1e-10) is tested.
"""
from __future__ import annotations

import torch

from kernels.decode_attention.reference import cached_attention, cached_attention_rows, row_keys

from .attention import attend_cached
from .block_forward import BlockWeights, block_forward, layer_table
from .kv_cache import KVCache

__all__ = ["CachedForward"]


class CachedForward:
    """The transformer of ``model`` (a ``TokenTransformer``) over cached positions."""

    def __init__(self, model) -> None:
        self.layers = layer_table(model.transformer)
        self._params = [(p, p.data_ptr()) for p in model.transformer.parameters()]
        # CPU: scaled_dot_product_attention on the visible keys; elsewhere the registered decode
        # backend (the Triton kernel on CUDA) through attend_cached.
        self.sdpa = model.x_emb.weight.device.type == "cpu"
        self._pos, self._cache, self._shape = 0, None, (0, 0)
        self._starts = self._valid = self._plans = None

    def stale(self) -> bool:
        """Whether the model's parameters were replaced since construction (``model.to(...)``
        swaps their storage; the views taken here would still read the old weights)."""
        return any(p.data_ptr() != ptr for p, ptr in self._params)

    def __call__(self, x: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        one = x.dim() == 2
        N, T, W = (x.shape[0], 1, x.shape[1]) if one else x.shape
        self._pos, self._cache, self._shape = pos, cache, (N, T)
        x = x.reshape(N * T, W)
        for L in self.layers:
            x = block_forward(L, x, self._attend)
        self._cache = None
        return x if one else x.view(N, T, W)

    def rows(self, x: torch.Tensor, starts: torch.Tensor, valid: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Final activations ``(N, T, W)`` of inputs ``x: (N, T, W)`` at per-row positions
        ``starts[n] + t``; keys of ``t < valid[n]`` enter ``cache`` (``starts``, ``valid``: ``(N,)``
        long tensors on ``x``'s device). Where each query reads and each key goes is worked out
        once per pattern (``row_keys``, ``KVCache.row_slots``) and shared by its layers."""
        N, T, W = x.shape
        self._starts, self._valid, self._cache, self._shape = starts, valid, cache, (N, T)
        self._plans = {}
        h = x.reshape(N * T, W)
        for L in self.layers:
            h = block_forward(L, h, self._attend_rows)
        self._starts = self._valid = self._cache = self._plans = None
        return h.view(N, T, W)

    def _attend_rows(self, L: BlockWeights, h: torch.Tensor) -> torch.Tensor:
        (N, T), cache, starts = self._shape, self._cache, self._starts
        kc, vc = cache.k[L.index], cache.v[L.index]
        plan = self._plans.get(L.pattern)
        if plan is None:
            slots = None if L.pattern == "cross" else cache.row_slots(L.index, starts, self._valid, T)
            plan = self._plans[L.pattern] = (slots, row_keys(L.pattern, starts, T, L.block_len, kc))
        q = torch.addmm(L.b_q, h, L.w_q).view(N, T, L.heads, L.head_dim)
        if L.pattern != "cross":
            cache.write_rows(L.index, torch.addmm(L.b_kv, h, L.w_kv).view(N, T, -1), starts, self._valid, plan[0])
        a = cached_attention_rows(q, kc, vc, L.pattern, starts, L.block_len, L.prime_len, keys=plan[1])
        return a.reshape(N * T, L.n_state)

    def _attend(self, L: BlockWeights, h: torch.Tensor) -> torch.Tensor | None:
        (N, T), pos, cache = self._shape, self._pos, self._cache
        q = torch.addmm(L.b_q, h, L.w_q).view(N, T, L.heads, L.head_dim)
        if L.pattern != "cross":
            cache.write_projected(L.index, pos, h, L.w_kv, L.b_kv)
        kc, vc = cache.k[L.index], cache.v[L.index]
        if self.sdpa:
            a = cached_attention(q, kc, vc, L.pattern, pos, L.block_len, L.prime_len)
            if a is None:
                return None
        else:
            a = attend_cached(q, kc, vc, L.pattern, pos, L.block_len, L.prime_len)
        return a.reshape(N * T, L.n_state)
