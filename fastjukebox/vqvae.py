"""Hierarchical VQ-VAE: audio <-> codes at three temporal resolutions."""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import VQVAEConfig, resolve_config
from .convs import Decoder, Encoder


class Codebook(nn.Module):
    def __init__(self, l_bins: int, emb_width: int):
        super().__init__()
        self.register_buffer("k", torch.randn(l_bins, emb_width))

    def quantise(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, T] encoder output -> [N, T] index of the nearest code (squared L2)."""
        N, C, T = x.shape
        flat = x.permute(0, 2, 1).reshape(-1, C)
        k = self.k.to(flat.dtype)
        # ||x||^2 - 2 x.k + ||k||^2, the same expansion (and so the same ties) as the original
        dist = (flat ** 2).sum(-1, keepdim=True) - 2 * flat @ k.t() + (k ** 2).sum(-1)[None]
        return dist.argmin(dim=-1).view(N, T)

    def dequantise(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [N, T] -> [N, C, T]."""
        return nn.functional.embedding(codes, self.k).permute(0, 2, 1)


class Bottleneck(nn.Module):
    def __init__(self, l_bins: int, emb_width: int, levels: int):
        super().__init__()
        self.level_blocks = nn.ModuleList(Codebook(l_bins, emb_width) for _ in range(levels))


class VQVAE(nn.Module):
    """Encode mono audio to codes at every level; decode one level's codes back to audio.

    Decoding level ``L`` uses decoder ``L`` alone (as the original's samplers do).
    """

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = c = config
        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(c.levels):
            kw = dict(width=c.width * c.multipliers[level], depth=c.depth * c.multipliers[level],
                      m_conv=c.m_conv, dilation_growth_rate=c.dilation_growth_rate,
                      dilation_cycle=c.dilation_cycle)
            downs, strides = c.downs_t[: level + 1], c.strides_t[: level + 1]
            self.encoders.append(Encoder(1, c.emb_width, downs, strides, **kw))
            self.decoders.append(Decoder(1, c.emb_width, downs, strides, c.reverse_decoder_dilation, **kw))
        self.bottleneck = Bottleneck(c.l_bins, c.emb_width, c.levels)

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "vqvae") -> "VQVAE":
        """A released architecture with fresh weights (works under ``torch.device("meta")``)."""
        return cls(resolve_config(name, "vqvae"))

    def whole_top_codes(self, audio: torch.Tensor, what: str = "audio") -> torch.Tensor:
        """Mono audio (T,) as a batch of one (1, T'), cut to a whole number of top-level codes."""
        hop = self.hop_lengths[-1]
        keep = audio.shape[0] // hop * hop
        if keep == 0:
            raise ValueError(f"{what} is shorter than one top-level code ({hop} samples at {self.config.sr} Hz)")
        return audio[None, :keep]

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the original key names (the module tree already uses them)."""
        return dict(self.state_dict())

    # --- inference --------------------------------------------------------------------------
    @property
    def hop_lengths(self) -> tuple[int, ...]:
        return self.config.hop_lengths

    def _audio(self, audio: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(audio):
            audio = torch.as_tensor(audio)
        if audio.dim() == 3:
            if audio.shape[-1] != 1:
                raise ValueError(f"audio must be mono: (N, T) or (N, T, 1); got shape {tuple(audio.shape)}")
            audio = audio[..., 0]
        if audio.dim() != 2:
            raise ValueError(f"audio must have shape (N, T) or (N, T, 1); got rank {audio.dim()} "
                             f"shape {tuple(audio.shape)}")
        if not audio.is_floating_point():
            raise ValueError(f"audio must be floating point in [-1, 1], got {audio.dtype}")
        if audio.shape[1] < self.hop_lengths[-1]:
            raise ValueError(f"audio has {audio.shape[1]} samples; encoding needs at least "
                             f"{self.hop_lengths[-1]} (one code of the top level)")
        p = next(self.parameters())
        return audio.to(device=p.device, dtype=p.dtype)[:, None, :]  # [N, 1, T]

    @torch.no_grad()
    def encode(self, audio: torch.Tensor, levels: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        """audio: (N, T) or (N, T, 1) float in [-1, 1] -> codes per level, level 0 first,
        each (N, T // hop_length[level]). ``levels`` limits which levels are computed (the
        others come back as ``None``)."""
        x = self._audio(audio)
        wanted = range(self.config.levels) if levels is None else levels
        return [self.bottleneck.level_blocks[l].quantise(self.encoders[l](x)) if l in wanted else None
                for l in range(self.config.levels)]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, level: int = 0) -> torch.Tensor:
        """codes: (N, T_level) of one level -> audio (N, T_level * hop_length[level]), unclipped."""
        if not 0 <= level < self.config.levels:
            raise ValueError(f"level must be in 0..{self.config.levels - 1}, got {level}")
        codes = torch.as_tensor(codes)
        if codes.dim() != 2 or codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"codes must be an integer tensor (N, T); got {codes.dtype} shape {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.l_bins):
            raise ValueError(f"codes must be in [0, {self.config.l_bins}); got range "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        k = self.bottleneck.level_blocks[level]
        x = k.dequantise(codes.long().to(k.k.device))
        return self.decoders[level](x)[:, 0, :]
