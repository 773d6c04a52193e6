"""A Jukebox prior: the token model of one level with its conditioners.

Submodule names follow the released checkpoints: ``prior`` (token model), ``conditioner_blocks.0``
(upsamplers), ``y_emb`` (labels and timing), ``prime_prior`` / ``prime_state_proj`` /
``prime_state_ln`` / ``prime_x_out`` (5b_lyrics lyric encoder).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .token_model import TokenTransformer
from .conditioners import LabelConditioner, UpsamplerConditioner
from .config import PriorConfig, resolve_config
from .layers import Conv1D, LayerNorm


@dataclass
class Conditioning:
    """Everything a window's tokens are conditioned on, computed once per window.

    x_cond: (N, seq_len, W) added to the input (and, unless ``merged_decoder``, to the output)
        at every position, or None. For merged-lyric priors it is zero on the lyric positions.
    start: (N, 1, W) start embedding from the labels, or None (learned start token).
    encoder_kv: (N, n_tokens, W) lyric-encoder states read by cross-attention layers, or None.
    lyric_tokens: (N, n_tokens) lyric ids that prefix the sequence of merged-lyric priors, or None.
    """

    x_cond: torch.Tensor | None
    start: torch.Tensor | None
    encoder_kv: torch.Tensor | None = None
    lyric_tokens: torch.Tensor | None = None


def _check_ids(name: str, x: torch.Tensor, n: int) -> None:
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= n):
        raise ValueError(f"{name} must be in [0, {n}); got values in [{int(x.min())}, {int(x.max())}]")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _as_long(name: str, x, rank: int = 2) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")
    return x.long()


def upsampler_conditioner(c: PriorConfig) -> UpsamplerConditioner:
    """The conditioner that turns the level above's codes into ``x_cond`` (upsamplers)."""
    nxt = c.level + 1
    return UpsamplerConditioner(c.l_bins, c.width, c.downs_t[nxt], c.strides_t[nxt], c.cond_width, c.cond_depth,
                                c.cond_m_conv, c.cond_dilation_growth_rate, c.cond_dilation_cycle,
                                c.cond_res_scale, c.cond_c_res, c.init_scale)


def label_conditioner(c: PriorConfig) -> LabelConditioner:
    """Artist / genre start embedding and (top level) timing signal."""
    return LabelConditioner(c.y_bins, c.t_bins, c.sr, c.min_duration, c.max_duration, c.n_ctx, c.width,
                            c.max_bow_genre_size, c.is_top, c.init_scale)


class Prior(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = c = config
        if not c.is_top:
            self.conditioner_blocks = nn.ModuleList([upsampler_conditioner(c)])
        if c.labels:
            self.y_emb = label_conditioner(c)
        if c.lyrics == "encoder":
            self.prime_prior = TokenTransformer(
                c.n_vocab, c.n_tokens, c.prime_width, c.prime_depth, c.prime_heads, c.prime_attn_order,
                c.prime_blocks or 1, m_attn=c.prime_m_attn, m_mlp=c.prime_m_mlp, y_cond=False,
                only_encode=True, init_scale=c.prime_init_scale)
            self.prime_state_proj = Conv1D(c.prime_width, c.width, c.prime_init_scale)
            self.prime_state_ln = LayerNorm(c.width)
            self.prime_x_out = nn.Linear(c.width, c.n_vocab, bias=False)
            nn.init.normal_(self.prime_x_out.weight, std=0.02 * c.init_scale)
        self.prior = TokenTransformer(
            c.bins, c.seq_len, c.width, c.depth, c.heads, c.attn_order, c.blocks, m_attn=c.m_attn,
            m_mlp=c.m_mlp, res_scale=c.res_scale, prime_len=c.prime_len, y_cond=c.labels,
            merged_decoder=c.merged_decoder, init_scale=c.init_scale)

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> "Prior":
        """A released architecture with fresh weights (works under ``torch.device("meta")``)."""
        return cls(resolve_config(name, "prior"))

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.prior.x_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return self.prior.x_emb.weight.dtype

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the original key names (the module tree already uses them; tied
        ``prior.x_out.weight`` is listed as in the original files)."""
        return dict(self.state_dict())

    # --- conditioning -----------------------------------------------------------------------
    def check_labels(self, labels) -> torch.Tensor | None:
        c = self.config
        if not c.labels:
            if labels is not None and torch.as_tensor(labels).numel():
                raise ValueError("this prior takes no labels")
            return None
        if labels is None:
            raise ValueError(f"this prior needs labels: (N, {c.label_len}) rows "
                             f"[total_length, offset, sample_length, artist, genre x {c.max_bow_genre_size}"
                             + (f", lyric x {c.n_tokens}]" if c.n_tokens else "]"))
        y = _as_long("labels", labels)
        if y.shape[1] != c.label_len:
            raise ValueError(f"labels must have 4 + {c.max_bow_genre_size} genres + {c.n_tokens} lyric tokens = "
                             f"{c.label_len} columns, got {y.shape[1]}")
        if c.n_tokens:
            _check_ids("lyric tokens", y[:, -c.n_tokens:], c.n_vocab)
        return y

    def condition(self, upper=None, labels=None) -> Conditioning:
        """Conditioning for one window.

        upper: (N, n_ctx // cond_downsample) codes of the level above (upsamplers only).
        labels: (N, label_len) label rows for this window (see ``fastjukebox.labels``).
        """
        c = self.config
        dev = self.device
        y = self.check_labels(labels)
        start = timing = None
        if y is not None:
            y = y.to(dev)
            start, timing = self.y_emb(y[:, : 4 + c.max_bow_genre_size])
        if c.is_top:
            if upper is not None:
                raise ValueError("the top-level prior takes no upper-level codes")
            x_cond = timing
        else:
            if upper is None:
                raise ValueError(f"an upsampler needs the level-{c.level + 1} codes of its window")
            z = _as_long("upper", upper).to(dev)
            want = c.n_ctx // c.cond_downsample
            if z.shape[1] != want:
                raise ValueError(f"upper codes must cover the window: {want} level-{c.level + 1} codes, got {z.shape[1]}")
            if y is not None and z.shape[0] != y.shape[0]:
                raise ValueError(f"upper has batch {z.shape[0]} but labels have {y.shape[0]}")
            _check_ids("upper codes", z, c.l_bins)
            x_cond = self.conditioner_blocks[0](z)
        encoder_kv = lyric = None
        if c.lyrics is not None:
            lyric = y[:, -c.n_tokens:]
            if c.lyrics == "encoder":
                h = self.prime_prior(lyric)
                encoder_kv = self.prime_state_ln(self.prime_state_proj(h))
            else:
                N = lyric.shape[0]
                zeros = torch.zeros(N, c.n_tokens, c.width, device=dev, dtype=self.dtype)
                x_cond = torch.cat([zeros, x_cond], dim=1)
        if start is not None:
            start = start.to(self.dtype)
        if x_cond is not None:
            x_cond = x_cond.to(self.dtype)
        return Conditioning(x_cond, start, encoder_kv, lyric)

    # --- teacher forcing --------------------------------------------------------------------
    def _sequence(self, tokens, cond: Conditioning) -> tuple[torch.Tensor, int]:
        c = self.config
        z = _as_long("tokens", tokens).to(self.device)
        if z.shape[1] > c.n_ctx:
            raise ValueError(f"tokens has {z.shape[1]} positions but this prior's window is n_ctx={c.n_ctx}")
        if z.shape[1] == 0:
            raise ValueError("tokens is empty")
        _check_ids("token ids", z, c.l_bins)
        batch = next((t.shape[0] for t in (cond.start, cond.x_cond, cond.lyric_tokens) if t is not None), z.shape[0])
        if batch != z.shape[0]:
            raise ValueError(f"tokens have batch {z.shape[0]} but the conditioning has batch {batch}")
        if c.lyrics == "merged":
            z = torch.cat([cond.lyric_tokens, z + c.n_vocab], dim=1)
        return z, z.shape[1]

    def logits(self, tokens, upper=None, labels=None) -> torch.Tensor:
        """Teacher-forced, pre-temperature logits.

        tokens: (N, T) codes of this level, T <= n_ctx (positions past T are never read: the
            model is causal).
        upper: (N, n_ctx // 4) codes of the level above (upsamplers).
        labels: (N, label_len) label row of this window.
        Returns (N, T, l_bins), logits[:, t] scoring token t. For merged-lyric (1b-style) priors
        the lyric tokens ``labels[:, -n_tokens:]`` come first in the sequence and music ids are
        shifted by ``n_vocab``; the result is (N, n_tokens + T, n_vocab + l_bins) and covers both
        parts, lyric positions first.
        """
        cond = self.condition(upper, labels)
        seq, _ = self._sequence(tokens, cond)
        return self.prior(seq, cond.x_cond, cond.start, cond.encoder_kv)

    def prime_logits(self, labels) -> torch.Tensor:
        """5b_lyrics only: lyric logits from the encoder states, (N, n_tokens, n_vocab)."""
        if self.config.lyrics != "encoder":
            raise ValueError("only priors with a lyric encoder have prime logits")
        return self.prime_x_out(self.condition(None, labels).encoder_kv)

    def loss(self, tokens, upper=None, labels=None) -> dict[str, torch.Tensor]:
        """Cross-entropies in bits: ``gen_loss`` (music), ``prime_loss`` (lyrics) and the weighted
        ``loss`` the original trains on."""
        c = self.config
        cond = self.condition(upper, labels)
        seq, _ = self._sequence(tokens, cond)
        if seq.shape[1] != c.seq_len:
            raise ValueError(f"the loss needs a full window of n_ctx={c.n_ctx} tokens")
        logits = _at_least_fp32(self.prior(seq, cond.x_cond, cond.start, cond.encoder_kv))
        bits = 1.0 / math.log(2.0)
        p = c.n_lyric_prefix
        gen = F.cross_entropy(logits[:, p:].reshape(-1, logits.shape[-1]), seq[:, p:].reshape(-1)) * bits
        prime = torch.zeros((), device=gen.device, dtype=gen.dtype)
        if c.lyrics == "merged":
            prime = F.cross_entropy(logits[:, :p].reshape(-1, logits.shape[-1]), seq[:, :p].reshape(-1)) * bits
        elif c.lyrics == "encoder":
            pl = _at_least_fp32(self.prime_x_out(cond.encoder_kv))
            prime = F.cross_entropy(pl.reshape(-1, c.n_vocab), cond.lyric_tokens.reshape(-1)) * bits
        total = c.n_tokens + c.n_ctx
        loss = c.prime_loss_fraction * prime * c.n_tokens / total + gen * c.n_ctx / total
        return {"loss": loss, "gen_loss": gen, "prime_loss": prime}
