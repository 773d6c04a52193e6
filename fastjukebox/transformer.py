"""The prior's transformer: pre-LN residual blocks with factored attention.

Module and parameter names follow the released checkpoints (``_attn_mods.{d}.attn.c_attn.w``...),
so a state dict loads without any key mapping.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import attend, attend_cached, layer_patterns
from .layers import Conv1D, LayerNorm, quick_gelu


class FactoredAttention(nn.Module):
    """Multi-head attention of one factored pattern.

    ``project_qkv`` / ``project_out`` are public so a sampler can run the projections and keep
    its own key/value cache while the pattern logic stays in ``attend``.
    """

    def __init__(self, width: int, n_state: int, heads: int, pattern: str, block_len: int,
                 prime_len: int | None = None, init_scale: float = 1.0):
        super().__init__()
        self.n_state, self.heads, self.head_dim = n_state, heads, n_state // heads
        self.pattern, self.block_len, self.prime_len = pattern, block_len, prime_len
        if pattern == "cross":
            self.c_attn = Conv1D(width, n_state, init_scale)
            self.c_enc_kv = Conv1D(width, 2 * n_state, init_scale)
        else:
            self.c_attn = Conv1D(width, 3 * n_state, init_scale)
        self.c_proj = Conv1D(n_state, width, init_scale)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.heads, self.head_dim)  # [B, T, H, D]

    def project_qkv(self, x: torch.Tensor, encoder_kv: torch.Tensor | None = None):
        """x: [B, T, W] -> q, k, v: [B, T, H, D] (k, v over the encoder for ``cross``)."""
        if self.pattern == "cross":
            if encoder_kv is None:
                raise ValueError("a cross-attention layer needs the lyric encoder's output")
            k, v = self.c_enc_kv(encoder_kv.to(x.dtype)).chunk(2, dim=-1)
            return self._heads(self.c_attn(x)), self._heads(k), self._heads(v)
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        return self._heads(q), self._heads(k), self._heads(v)

    def project_out(self, a: torch.Tensor) -> torch.Tensor:
        """a: [B, T, H, D] -> [B, T, W]."""
        return self.c_proj(a.reshape(*a.shape[:2], self.n_state))

    def forward(self, x: torch.Tensor, encoder_kv: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
        q, k, v = self.project_qkv(x, encoder_kv)
        a = attend(q, k, v, self.pattern, block_len=self.block_len, causal=causal, prime_len=self.prime_len)
        return self.project_out(a)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, init_scale: float = 1.0):
        super().__init__()
        self.c_fc = Conv1D(width, hidden, init_scale)
        self.c_proj = Conv1D(hidden, width, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class ResAttnBlock(nn.Module):
    """``h = x + a + m`` with ``a = attn(ln_0(x))`` and ``m = mlp(ln_1(x + a))``."""

    def __init__(self, width: int, n_state: int, heads: int, pattern: str, block_len: int,
                 prime_len: int | None = None, m_mlp: float = 1.0, res_scale: float = 1.0,
                 init_scale: float = 1.0):
        super().__init__()
        self.attn = FactoredAttention(width, n_state, heads, pattern, block_len, prime_len, init_scale)
        self.ln_0 = LayerNorm(width)
        self.mlp = MLP(width, int(m_mlp * width), init_scale)
        self.ln_1 = LayerNorm(width)
        self.res_scale = res_scale

    def residual(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The block's output given its attention output ``a`` (shared with cached decoding)."""
        m = self.mlp(self.ln_1(x + a))
        if self.res_scale == 1.0:
            return x + a + m
        return x + self.res_scale * (a + m)

    def forward(self, x: torch.Tensor, encoder_kv: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
        return self.residual(x, self.attn(self.ln_0(x), encoder_kv, causal))

    def decode(self, x: torch.Tensor, cache, index: int, pos: int) -> torch.Tensor:
        """Cached decoding: inputs ``x: [N, T, W]`` at positions ``[pos, pos + T)`` inside one
        block; their keys/values go into layer ``index`` of ``cache`` (a ``KVCache``).

        The same arithmetic as ``forward``; submodules' ``forward`` is called directly because
        a step is small enough for module-call overhead to be a sizeable part of it."""
        attn, mlp = self.attn, self.mlp
        h = self.ln_0.forward(x)
        if attn.pattern == "cross":
            q = attn._heads(attn.c_attn.forward(h))
        else:
            q, k, v = attn.c_attn.forward(h).chunk(3, dim=-1)
            q, k, v = attn._heads(q), attn._heads(k), attn._heads(v)
            cache.write(index, k, v, pos)
        a = attend_cached(q, cache.k[index], cache.v[index], attn.pattern, pos, attn.block_len, attn.prime_len)
        a = attn.c_proj.forward(a.reshape(*a.shape[:2], attn.n_state))
        xa = x + a
        m = mlp.c_proj.forward(quick_gelu(mlp.c_fc.forward(self.ln_1.forward(xa))))
        if self.res_scale == 1.0:
            return xa + m
        return x + self.res_scale * (a + m)


class Transformer(nn.Module):
    def __init__(self, width: int, seq_len: int, heads: int, depth: int, attn_order: int, blocks: int,
                 m_attn: float = 0.25, m_mlp: float = 1.0, res_scale: bool = False,
                 prime_len: int | None = None, init_scale: float = 1.0):
        super().__init__()
        if seq_len % blocks:
            raise ValueError(f"sequence length {seq_len} is not a multiple of blocks={blocks}")
        self.patterns = layer_patterns(attn_order, depth)
        block_len = seq_len // blocks
        scale = 1.0 / depth if res_scale else 1.0
        self._attn_mods = nn.ModuleList(
            ResAttnBlock(width, int(m_attn * width), heads, p, block_len, prime_len, m_mlp, scale, init_scale)
            for p in self.patterns
        )

    def forward(self, x: torch.Tensor, encoder_kv: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
        for layer in self._attn_mods:
            x = layer(x, encoder_kv, causal)
        return x
