"""The prior's transformer: pre-LN residual blocks with factored attention.

Module and parameter names follow the released checkpoints (``_attn_mods.{d}.attn.c_attn.w``...),
so a state dict loads without any key mapping.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import attend, layer_patterns
from .block_forward import BlockWeights, block_forward, encoder_keys
from .layers import Conv1D, LayerNorm


class FactoredAttention(nn.Module):
    """The parameters of one factored-attention layer: the input projection ``c_attn`` (queries,
    keys and values; the query alone for ``cross`` layers, whose keys/values come from the lyric
    encoder through ``c_enc_kv``) and the output projection ``c_proj``. The arithmetic is
    ``fastjukebox.block_forward``."""

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


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, init_scale: float = 1.0):
        super().__init__()
        self.c_fc = Conv1D(width, hidden, init_scale)
        self.c_proj = Conv1D(hidden, width, init_scale)


class TeacherForced:
    """Attention of a whole given sequence ``(N, T)`` (training, scoring, the reference of every
    cached path): queries, keys and values from the same rows, ``cross`` layers' keys from the
    lyric encoder, through ``attention.attend`` (``causal=False``: bidirectional)."""

    __slots__ = ("N", "T", "encoder_kv", "causal")

    def __init__(self, N: int, T: int, encoder_kv: torch.Tensor | None = None, causal: bool = True):
        self.N, self.T, self.encoder_kv, self.causal = N, T, encoder_kv, causal

    def __call__(self, L: BlockWeights, h: torch.Tensor) -> torch.Tensor:
        N, T, H, D = self.N, self.T, L.heads, L.head_dim
        if L.pattern == "cross":
            if self.encoder_kv is None:
                raise ValueError("a cross-attention layer needs the lyric encoder's output")
            q = torch.addmm(L.b_qkv, h, L.w_qkv).view(N, T, H, D)
            k, v = encoder_keys(L, self.encoder_kv.to(h.dtype))
        else:
            q, k, v = torch.addmm(L.b_qkv, h, L.w_qkv).view(N, T, 3, H, D).unbind(2)
        a = attend(q, k, v, L.pattern, block_len=L.block_len, causal=self.causal, prime_len=L.prime_len)
        return a.reshape(N * T, L.n_state)


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

    def forward(self, x: torch.Tensor, encoder_kv: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
        N, T, W = x.shape
        y = block_forward(BlockWeights(self), x.reshape(N * T, W), TeacherForced(N, T, encoder_kv, causal))
        return y.view(N, T, W)


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
        N, T, W = x.shape
        attention = TeacherForced(N, T, encoder_kv, causal)
        x = x.reshape(N * T, W)
        for layer in self._attn_mods:
            x = block_forward(BlockWeights(layer), x, attention)
        return x.view(N, T, W)
