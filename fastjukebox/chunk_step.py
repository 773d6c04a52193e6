"""A cached forward of a few consecutive positions (one block), laid out like ``TokenStep``.

Speculative sampling scores a chunk of proposed positions in one teacher call
(``WindowDecoder.score``); at batch 1 on a CPU that call costs its number of tensor operations,
so the chunk goes through each layer with as many of them as one token does in ``TokenStep``
(same norms, the same folded ``quick_gelu``, one ``addmm`` each for queries and keys/values) and
one ``scaled_dot_product_attention`` per layer over the keys the chunk's queries may see:

============== ===================================================================
``block``      this block's slots ``0 .. s0 + T - 1``, causal inside the chunk
``prev_block`` the whole previous block (none in block 0: the projection is its bias)
``transpose``  each query its own column, blocks ``0 .. b`` (all visible)
``dense``      positions ``0 .. pos + T - 1``, causal; ``prime``: cut at ``prime_len``
``cross``      every encoder position
============== ===================================================================

On CUDA the attention goes through ``attention.attend_cached`` (the Triton kernel). Exact in
real arithmetic; float64 parity with one-token steps to 1e-10 is tested.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import attend_cached
from .kv_cache import KVCache
from .layers import QUICK_GELU_SCALE
from .token_step import TokenStep

__all__ = ["ChunkStep"]


class ChunkStep(TokenStep):
    """The transformer of ``model`` for positions ``[pos, pos + T)`` inside one block:
    ``(x: (N, T, W), pos, cache) -> (N, T, W)``, keys/values written into ``cache``."""

    def __call__(self, x: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        N, T, W = x.shape
        x = x.reshape(N * T, W)
        for L in self.layers:
            h = L.norm(L.ln_0, x)
            q = torch.addmm(L.b_q, h, L.w_q).view(N, T, L.heads, L.head_dim)
            if L.pattern != "cross":
                kv = torch.addmm(L.b_kv, h, L.w_kv).view(N, T, 2, L.heads, L.head_dim)
                cache.write(L.index, kv[:, :, 0], kv[:, :, 1], pos)
            a = self._attend_chunk(L, q, cache.k[L.index], cache.v[L.index], pos)
            a = L.b_proj.expand(N * T, -1) if a is None else torch.addmm(L.b_proj, a, L.w_proj)
            xa = x + a
            m = torch.addmm(L.b_fc, L.norm(L.ln_1, xa), L.w_fc, beta=QUICK_GELU_SCALE, alpha=QUICK_GELU_SCALE)
            m = torch.addmm(L.b_out, F.silu(m, inplace=True), L.w_out, alpha=1.0 / QUICK_GELU_SCALE)
            x = m.add_(xa) if L.res_scale == 1.0 else x + L.res_scale * (a + m)
        return x.view(N, T, W)

    def _attend_chunk(self, L, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: int):
        """Attention output ``(N * T, n_state)`` of the queries ``q: (N, T, H, D)``, or None where
        they see no key (``prev_block`` in block 0)."""
        N, T = q.shape[:2]
        if not self.sdpa:
            return attend_cached(q, kc, vc, L.pattern, pos, L.block_len, L.prime_len).reshape(N * T, L.n_state)
        b, s0 = divmod(pos, L.block_len)
        mask = None
        if L.pattern == "transpose":          # (N, T, H, 1, D) against (N, T, H, b + 1, D)
            k, v = (c[:, s0:s0 + T, :b + 1].transpose(2, 3) for c in (kc, vc))
            a = F.scaled_dot_product_attention(q.unsqueeze(-2), k, v)
            return a.reshape(N * T, L.n_state)
        if L.pattern == "block":
            first, k, v = s0, kc[:, :s0 + T], vc[:, :s0 + T]
        elif L.pattern == "prev_block":
            if b == 0:
                return None
            first, k, v = None, kc[:, (b - 1) % 2], vc[:, (b - 1) % 2]
        elif L.pattern == "cross":
            first, k, v = None, kc, vc
        else:                                 # dense, prime
            S = pos + T if L.pattern == "dense" else min(pos + T, L.prime_len)
            first, k, v = pos, kc[:, :S], vc[:, :S]
        if first is not None and T > 1:       # query r sees keys j <= first + r
            mask = torch.ones(T, k.shape[1], dtype=torch.bool, device=q.device).tril_(first)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return a.transpose(1, 2).reshape(N * T, L.n_state)
