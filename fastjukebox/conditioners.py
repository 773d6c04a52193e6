"""Conditioning of a prior: codes of the level above, and artist / genre / timing labels."""
from __future__ import annotations

import torch
import torch.nn as nn

from .convs import DecoderConvBlock
from .layers import LayerNorm
from .timing_bins import time_bins


class UpsamplerConditioner(nn.Module):
    """Upper-level codes -> embedding -> conv stack up-sampling to this level's rate -> LayerNorm.

    (N, T_upper) codes -> (N, T_upper * up, width), added to the prior's input at every position.
    """

    def __init__(self, bins: int, width: int, down_t: int, stride_t: int, cond_width: int, cond_depth: int,
                 m_conv: float, dilation_growth_rate: int, dilation_cycle: int | None, res_scale: bool,
                 blocks_name: bool, init_scale: float = 1.0):
        super().__init__()
        self.x_emb = nn.Embedding(bins, width)
        nn.init.normal_(self.x_emb.weight, std=0.02 * init_scale)
        self.cond = DecoderConvBlock(width, width, down_t, stride_t, cond_width, cond_depth, m_conv,
                                     dilation_growth_rate, dilation_cycle, res_scale=res_scale,
                                     reverse_dilation=False, blocks_name=blocks_name)
        self.ln = LayerNorm(width)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.x_emb(codes).permute(0, 2, 1)      # [N, W, T_upper]
        x = self.cond(x).permute(0, 2, 1)            # [N, T, W]
        return self.ln(x)


class SimpleEmbedding(nn.Module):
    def __init__(self, bins: int, width: int, init_scale: float = 1.0):
        super().__init__()
        self.emb = nn.Embedding(bins, width)
        nn.init.normal_(self.emb.weight, std=0.01 * init_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


class LabelConditioner(nn.Module):
    """Label row ``[total_length, offset, length, artist, genre x G]`` ->

    * the start embedding ``artist_emb + sum(genre_emb over ids >= 0)``: (N, 1, W);
    * at the top level, the timing signal: binned total length, absolute and relative position
      interpolated across the window: (N, n_time, W).
    """

    def __init__(self, y_bins: tuple[int, int], t_bins: int, sr: int, min_duration: float | None,
                 max_duration: float | None, n_time: int, width: int, max_bow_genre_size: int,
                 include_time_signal: bool, init_scale: float = 1.0):
        super().__init__()
        self.genre_bins, self.artist_bins = y_bins
        self.max_bow_genre_size = max_bow_genre_size
        self.bow_genre_emb = SimpleEmbedding(self.genre_bins, width, init_scale)
        self.artist_emb = SimpleEmbedding(self.artist_bins, width, init_scale)
        self.include_time_signal = include_time_signal
        self.n_time, self.t_bins, self.sr = n_time, t_bins, sr
        self.min_duration, self.max_duration = min_duration, max_duration
        if include_time_signal:
            if min_duration is None or max_duration is None:
                raise ValueError("a top-level prior needs min_duration and max_duration")
            self.total_length_emb = SimpleEmbedding(t_bins, width, init_scale)
            self.absolute_pos_emb = SimpleEmbedding(t_bins, width, init_scale)
            self.relative_pos_emb = SimpleEmbedding(t_bins, width, init_scale)

    def check(self, y: torch.Tensor) -> None:
        """Raise a ValueError naming any label id outside its embedding table."""
        artist, genre = y[:, 3], y[:, 4:]
        if ((artist < 0) | (artist >= self.artist_bins)).any():
            raise ValueError(f"artist id must be in [0, {self.artist_bins}); got {artist.tolist()}")
        if ((genre < -1) | (genre >= self.genre_bins)).any():
            raise ValueError(f"genre ids must be in [0, {self.genre_bins}) or -1 (empty); got {genre.tolist()}")

    def time_bins(self, y: torch.Tensor):
        return time_bins(y[:, :3], self.n_time, self.t_bins, self.sr, self.min_duration, self.max_duration)

    def forward(self, y: torch.Tensor):
        """y: (N, 4 + G) LongTensor -> (start embedding (N, 1, W), timing (N, n_time, W) or None)."""
        self.check(y)
        genre = y[:, 4:]
        mask = (genre >= 0).unsqueeze(-1).to(self.artist_emb.emb.weight.dtype)
        start = self.artist_emb(y[:, 3:4]) + (self.bow_genre_emb(genre.clamp(min=0)) * mask).sum(1, keepdim=True)
        if not self.include_time_signal:
            return start, None
        total, absolute, relative = self.time_bins(y)
        timing = self.total_length_emb(total) + self.absolute_pos_emb(absolute) + self.relative_pos_emb(relative)
        return start, timing
