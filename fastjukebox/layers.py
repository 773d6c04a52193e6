"""Small building blocks shared by the priors: the original's linear layer and LayerNorm."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Conv1D(nn.Module):
    """Linear layer stored as ``w: (n_in, n_out)``, ``b: (n_out,)`` (checkpoint layout ``.w``/``.b``)."""

    def __init__(self, n_in: int, n_out: int, init_scale: float = 1.0):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n_in, n_out).normal_(std=0.02 * init_scale))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, x.reshape(-1, x.shape[-1]), self.w).view(*x.shape[:-1], self.w.shape[1])


class LayerNorm(nn.LayerNorm):
    """LayerNorm that normalises half-precision activations in fp32 (as the original does).

    Its parameters stay fp32 when a model is loaded in half precision (``keep_layernorms_fp32``),
    as in the original, so no step casts them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                                self.eps).to(x.dtype)
        return super().forward(x)


QUICK_GELU_SCALE = 1.702


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)


def keep_layernorms_fp32(model: nn.Module) -> nn.Module:
    """Return every ``LayerNorm`` of ``model`` to fp32 parameters (after a half-precision cast)."""
    for m in model.modules():
        if isinstance(m, LayerNorm):
            m.float()
    return model
