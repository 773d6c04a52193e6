"""The token model inside a prior: embeddings, transformer, output projection."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block_forward import BlockWeights, encoder_keys
from .transformer import Transformer


class PositionEmbedding(nn.Module):
    def __init__(self, seq_len: int, width: int, init_scale: float = 1.0):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.empty(seq_len, width).normal_(std=0.01 * init_scale))

    def forward(self) -> torch.Tensor:
        return self.pos_emb


class TokenTransformer(nn.Module):
    """Input at position ``t``: embedding of token ``t-1`` (position 0: the start embedding) +
    position embedding + ``x_cond[t]``. Output: logits over ``bins``, or the final activations
    when ``only_encode``.

    ``merged_decoder=False`` ties ``x_out`` to ``x_emb`` and adds ``x_cond`` again after the
    transformer; the 5b priors (``True``) do neither.
    """

    def __init__(self, bins: int, seq_len: int, width: int, depth: int, heads: int, attn_order: int,
                 blocks: int, *, m_attn: float = 0.25, m_mlp: float = 1.0, res_scale: bool = False,
                 prime_len: int | None = None, y_cond: bool = True, only_encode: bool = False,
                 merged_decoder: bool = False, init_scale: float = 1.0):
        super().__init__()
        self.bins, self.seq_len, self.width = bins, seq_len, width
        self.x_emb = nn.Embedding(bins, width)
        nn.init.normal_(self.x_emb.weight, std=0.02 * init_scale)
        self.y_cond = y_cond
        if not y_cond:
            self.start_token = nn.Parameter(torch.empty(1, width).normal_(std=0.01 * init_scale))
        self.pos_emb = PositionEmbedding(seq_len, width, init_scale)
        self.transformer = Transformer(width, seq_len, heads, depth, attn_order, blocks, m_attn, m_mlp,
                                       res_scale, prime_len, init_scale)
        self.only_encode = only_encode
        self.cond_after = not merged_decoder
        if not only_encode:
            self.x_out = nn.Linear(width, bins, bias=False)
            if not merged_decoder:
                self.x_out.weight = self.x_emb.weight

    @property
    def tied(self) -> bool:
        return not self.only_encode and self.x_out.weight is self.x_emb.weight

    def start_embedding(self, n: int, start: torch.Tensor | None) -> torch.Tensor:
        """(N, 1, W): the label embedding, or the learned start token for unlabelled models."""
        if self.y_cond:
            if start is None:
                raise ValueError("this model is conditioned on labels; pass labels")
            return start
        return self.start_token.expand(n, 1, self.width)

    def inputs(self, tokens: torch.Tensor, start: torch.Tensor | None, x_cond: torch.Tensor | None) -> torch.Tensor:
        """Teacher-forced transformer input for ``tokens`` (N, T), T <= seq_len -> (N, T, W)."""
        N, T = tokens.shape
        x = torch.cat([self.start_embedding(N, start).to(self.x_emb.weight.dtype),
                       self.x_emb(tokens[:, :-1])], dim=1)
        x = x + self.pos_emb()[:T]
        if x_cond is not None:
            x = x + x_cond[:, :T]
        return x

    def head(self, h: torch.Tensor, x_cond: torch.Tensor | None) -> torch.Tensor:
        """Final activations (N, T, W) and the conditioning at the same positions -> logits."""
        if self.cond_after and x_cond is not None:
            h = h + x_cond
        return F.linear(h, self.x_out.weight)

    def forward(self, tokens: torch.Tensor, x_cond: torch.Tensor | None = None, start: torch.Tensor | None = None,
                encoder_kv: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
        T = tokens.shape[1]
        h = self.transformer(self.inputs(tokens, start, x_cond), encoder_kv, causal)
        if self.only_encode:
            return h
        return self.head(h, None if x_cond is None else x_cond[:, :T])

    # --- cached decoding (used through ``fastjukebox.decoding.WindowDecoder``) --------------
    def inputs_at(self, tokens: torch.Tensor, pos: int, n: int, start: torch.Tensor | None,
                  x_cond: torch.Tensor | None) -> torch.Tensor:
        """Inputs of positions ``[pos, pos + n)`` read from the window's token buffer (N, seq_len)."""
        N = tokens.shape[0]
        lo = max(pos - 1, 0)
        x = self.x_emb(tokens[:, lo:pos + n - 1])
        if pos == 0:
            x = torch.cat([self.start_embedding(N, start).to(x.dtype), x], dim=1)
        x = x + self.pos_emb()[pos:pos + n]
        if x_cond is not None:
            x = x + x_cond[:, pos:pos + n]
        return x

    def input_one(self, tokens: torch.Tensor, pos: int, start: torch.Tensor | None,
                  x_cond_at: torch.Tensor | None) -> torch.Tensor:
        """``inputs_at(tokens, pos, 1, ...)`` as (N, W), for the one-token step; ``x_cond_at`` is
        the conditioning of this position only, (N, W) (the step adds it at the head too)."""
        if pos == 0:
            return self.inputs_at(tokens, 0, 1, start, None if x_cond_at is None else x_cond_at[:, None])[:, 0]
        x = self.x_emb(tokens[:, pos - 1]).add_(self.pos_emb.pos_emb[pos])
        return x if x_cond_at is None else x.add_(x_cond_at)

    def inputs_rows(self, tokens: torch.Tensor, positions: torch.Tensor, start: torch.Tensor | None,
                    x_cond_rows: torch.Tensor | None) -> torch.Tensor:
        """Inputs (N, T, W) at per-row positions ``positions: (N, T)`` (long, inside the window),
        read from the window's token buffer (N, seq_len): the embedding of the id at
        ``position - 1`` (position 0: the start embedding) plus the position's embedding;
        ``x_cond_rows`` is the conditioning at the same positions, (N, T, W)."""
        N = tokens.shape[0]
        x = self.x_emb(tokens.gather(1, (positions - 1).clamp(min=0)))
        first = (positions == 0)[..., None]
        x = torch.where(first, self.start_embedding(N, start).to(x.dtype), x)
        x = x + self.pos_emb()[positions]
        return x if x_cond_rows is None else x + x_cond_rows

    def set_cross_cache(self, cache, encoder_kv: torch.Tensor) -> None:
        """Project the lyric encoder's states once per window into the cross layers' cache."""
        for i, layer in enumerate(self.transformer._attn_mods):
            if layer.attn.pattern == "cross":
                cache.set_cross(i, *encoder_keys(BlockWeights(layer), encoder_kv.to(self.x_emb.weight.dtype)))
