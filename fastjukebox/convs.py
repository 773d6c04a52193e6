"""1-D convolution stacks of the VQ-VAE and of the upsampler conditioner.

Attribute names (``model``, ``blocks``, ``level_blocks``, ``out``) mirror the released checkpoints.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class ResConv1DBlock(nn.Module):
    """``x + res_scale * conv1x1(relu(conv3_dilated(relu(x))))``."""

    def __init__(self, n_in: int, n_state: int, dilation: int = 1, res_scale: float = 1.0):
        super().__init__()
        self.model = nn.Sequential(
            nn.ReLU(),
            nn.Conv1d(n_in, n_state, 3, 1, dilation, dilation),
            nn.ReLU(),
            nn.Conv1d(n_state, n_in, 1, 1, 0),
        )
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.model(x)


class Resnet1D(nn.Module):
    """Dilated residual stack; dilation ``growth ** (d % cycle)``.

    ``blocks_name=True`` stores the units under ``.blocks`` (the conditioner's checkpoint layout)
    instead of ``.model``.
    """

    def __init__(self, n_in: int, depth: int, m_conv: float = 1.0, dilation_growth_rate: int = 1,
                 dilation_cycle: int | None = None, res_scale: bool = False, reverse_dilation: bool = False,
                 blocks_name: bool = False):
        super().__init__()
        scale = 1.0 / math.sqrt(depth) if res_scale else 1.0
        units = [
            ResConv1DBlock(n_in, int(m_conv * n_in),
                           dilation_growth_rate ** (d if dilation_cycle is None else d % dilation_cycle), scale)
            for d in range(depth)
        ]
        if reverse_dilation:
            units = units[::-1]
        self._blocks_name = blocks_name
        if blocks_name:
            self.blocks = nn.ModuleList(units)
        else:
            self.model = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in (self.blocks if self._blocks_name else self.model):
            x = unit(x)
        return x


class EncoderConvBlock(nn.Module):
    """``down_t`` x [strided conv (k=4, s=2), residual stack], then a k=3 conv to ``out_width``."""

    def __init__(self, in_width: int, out_width: int, down_t: int, stride_t: int, width: int, depth: int,
                 m_conv: float, dilation_growth_rate: int, dilation_cycle: int | None):
        super().__init__()
        k, p = stride_t * 2, stride_t // 2
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.Conv1d(in_width if i == 0 else width, width, k, stride_t, p),
                Resnet1D(width, depth, m_conv, dilation_growth_rate, dilation_cycle),
            )
            for i in range(down_t)
        ]
        layers.append(nn.Conv1d(width, out_width, 3, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class DecoderConvBlock(nn.Module):
    """A k=3 conv to ``width``, then ``down_t`` x [residual stack, transposed conv (k=4, s=2)]."""

    def __init__(self, in_width: int, out_width: int, down_t: int, stride_t: int, width: int, depth: int,
                 m_conv: float, dilation_growth_rate: int, dilation_cycle: int | None,
                 res_scale: bool = False, reverse_dilation: bool = False, blocks_name: bool = False):
        super().__init__()
        k, p = stride_t * 2, stride_t // 2
        layers: list[nn.Module] = [nn.Conv1d(in_width, width, 3, 1, 1)]
        for i in range(down_t):
            layers.append(nn.Sequential(
                Resnet1D(width, depth, m_conv, dilation_growth_rate, dilation_cycle, res_scale,
                         reverse_dilation, blocks_name),
                nn.ConvTranspose1d(width, out_width if i == down_t - 1 else width, k, stride_t, p),
            ))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Encoder(nn.Module):
    """Encoder of one VQ-VAE level: the first ``level + 1`` down-sampling blocks."""

    def __init__(self, in_channels: int, emb_width: int, downs_t, strides_t, **block_kwargs):
        super().__init__()
        self.level_blocks = nn.ModuleList(
            EncoderConvBlock(in_channels if i == 0 else emb_width, emb_width, d, s, **block_kwargs)
            for i, (d, s) in enumerate(zip(downs_t, strides_t))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.level_blocks:
            x = block(x)
        return x


class Decoder(nn.Module):
    """Decoder of one VQ-VAE level: up-sampling blocks in reverse order, then ``out``."""

    def __init__(self, out_channels: int, emb_width: int, downs_t, strides_t, reverse_dilation: bool,
                 **block_kwargs):
        super().__init__()
        self.level_blocks = nn.ModuleList(
            DecoderConvBlock(emb_width, emb_width, d, s, reverse_dilation=reverse_dilation, **block_kwargs)
            for d, s in zip(downs_t, strides_t)
        )
        self.out = nn.Conv1d(emb_width, out_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.level_blocks):
            x = block(x)
        return self.out(x)
