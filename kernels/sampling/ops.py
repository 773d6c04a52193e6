"""Launcher of the fused sampling kernel; same draw as ``reference.sample_logits_reference``.

No host round trip: the Exp(1) noise is either given or drawn by torch on the logits' device with
the caller's generator (the same numbers ``fastjukebox.sampling.sample_logits`` draws), and the
token ids stay on the device.
"""
from __future__ import annotations

import numpy as np
import torch
import triton

from .kernel import sample_logits_kernel
from .reference import exponential_noise

__all__ = ["sample_logits", "supports", "block_v", "num_warps_for", "MAX_VOCAB"]

MAX_VOCAB = 4096


def supports(logits: torch.Tensor) -> bool:
    """Whether the kernel can take these logits on its own device (CUDA, 2-D, vocab <= 4096)."""
    return (logits.is_cuda and logits.dim() == 2 and 0 < logits.shape[1] <= MAX_VOCAB
            and logits.dtype in (torch.float16, torch.bfloat16, torch.float32))


def block_v(V: int) -> int:
    """The kernel's vocabulary tile: ``V`` rounded up to a power of two (at least 16)."""
    return max(16, triton.next_power_of_2(V))


def num_warps_for(block: int) -> int:
    """Warps of ``sample_logits_kernel`` for a vocabulary tile: at most 16 logits per thread (with
    4 warps a 4096 tile and top-k spilled 4 B on sm_90; kernels.compile_check)."""
    return max(1, min(8, block // 512))


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                  generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one id per row of ``logits: (N, V)`` from ``softmax(filter(logits / temperature))``.

    Args:
        temperature: > 0.
        top_k: keep the logits at or above the k-th largest (0: off; k >= V keeps all).
        top_p: keep the smallest set of most likely tokens whose mass exceeds ``top_p``, the first
            token past the threshold included (0: off).
        generator: draws the Exp(1) noise when ``noise`` is None.
        noise: ``(N, V)`` fp32 Exp(1) draws on the logits' device.
    Returns:
        ``(N,)`` int64 ids on the logits' device.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    N, V = logits.shape
    if not 0 < V <= MAX_VOCAB:
        raise ValueError(f"vocabulary size {V} is not supported (1..{MAX_VOCAB} in one tile)")
    if not logits.is_floating_point() or logits.dtype == torch.float64:
        raise ValueError(f"logits dtype {logits.dtype} is not supported (float16, bfloat16, float32)")
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    top_k, top_p = int(top_k), float(top_p)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if noise is None:
        noise = exponential_noise((N, V), logits.device, generator)
    elif noise.shape != (N, V) or noise.dtype != torch.float32 or noise.device != logits.device:
        raise ValueError(f"noise must be ({N}, {V}) float32 on {logits.device}, got "
                         f"{tuple(noise.shape)} {noise.dtype} on {noise.device}")
    out = torch.empty(N, dtype=torch.long, device=logits.device)
    if N == 0:
        return out
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    noise = noise if noise.stride(1) == 1 else noise.contiguous()
    # A division by a Python scalar is a multiplication by its fp32 reciprocal in PyTorch's CUDA
    # kernels and a true division on the CPU: do the same to scale exactly as the reference does.
    reciprocal = logits.is_cuda
    t = float(np.float32(1.0) / np.float32(temperature)) if reciprocal else temperature
    sample_logits_kernel[(N,)](
        logits, noise, out, V, logits.stride(0), noise.stride(0), t, min(top_k, V), top_p,
        RECIPROCAL=reciprocal, USE_TOP_K=0 < top_k < V, USE_TOP_P=top_p > 0.0,
        BLOCK_V=block_v(V), num_warps=num_warps_for(block_v(V)),
    )
    return out
