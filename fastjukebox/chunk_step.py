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

    def __init__(self, model) -> None:
        super().__init__(model)
        self._bias: torch.Tensor | None = None

    def causal_bias(self, T: int, first: int, like: torch.Tensor) -> torch.Tensor:
        """Additive mask ``(T, first + T)``: 0 where key ``j <= first + r`` for query row ``r``,
        ``-inf`` elsewhere; a view of one template (a float mask takes the CPU's fused attention
        kernel without the conversion a boolean one costs, and nothing is built per call).

        The template ``B`` is ``(rows, span)`` with ``B[r, j] = 0`` iff ``j <= span - rows + r``;
        the mask is ``B[:T, off:off + first + T]`` with ``off = span - rows - first``."""
        b = self._bias
        if b is None or b.shape[0] < T or b.shape[1] - b.shape[0] < first or b.dtype != like.dtype \
                or b.device != like.device:
            rows = max(16, T, 0 if b is None else b.shape[0])
            span = rows + max(first, self.layers[0].block_len if self.layers else 0,
                              0 if b is None else b.shape[1] - b.shape[0])
            keep = torch.ones(rows, span, dtype=torch.bool, device=like.device).tril_(span - rows)
            b = self._bias = torch.zeros(rows, span, dtype=like.dtype, device=like.device).masked_fill_(
                ~keep, float("-inf"))
        rows, span = b.shape
        off = span - rows - first
        return b[:T, off:off + first + T]

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
        if L.pattern == "transpose":          # (N T, H, 1, D) against (N T, H, b + 1, D)
            # 4-D, as the CPU's fused kernel takes (a 5-D batch falls back to the unfused math path)
            k, v = (c[:, s0:s0 + T, :b + 1].transpose(2, 3).reshape(N * T, L.heads, b + 1, L.head_dim)
                    for c in (kc, vc))
            a = F.scaled_dot_product_attention(q.reshape(N * T, L.heads, 1, L.head_dim), k, v)
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
            mask = self.causal_bias(T, first, q)[:, :k.shape[1]]      # prime: cut at prime_len
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return a.transpose(1, 2).reshape(N * T, L.n_state)
