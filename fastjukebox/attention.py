"""Which attention pattern each layer uses, and the one function every layer calls.

``attend`` is the single entry point for factored attention. It runs the plain-PyTorch
reference (``kernels.factored_attention.reference``) by default; faster backends register
themselves with ``register_backend`` and are chosen per call by ``set_backend`` /
the ``FASTJUKEBOX_ATTENTION`` environment variable (``auto`` | ``reference`` | a backend name).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from kernels.decode_attention.reference import decode_attention_reference
from kernels.factored_attention.reference import factored_attention_reference

__all__ = ["ATTN_FUNC_PATTERNS", "layer_patterns", "attend", "register_backend", "set_backend", "backend_name"]

# The original numbers its attention functions; these are the ones the released models use
# plus ``summary``. (5, "summary spread", never shipped and cannot be sampled in the original.)
ATTN_FUNC_PATTERNS = {0: "dense", 1: "block", 2: "transpose", 3: "prev_block", 4: "summary",
                      6: "cross", 7: "prime"}

_RBT = [1, 2, 3]  # row (block), column (transpose), previous row

_ORDERS: dict[int, Callable[[int], int]] = {
    0: lambda d: 0,
    1: lambda d: [1, 2][d % 2],
    2: lambda d: _RBT[d % 3],
    3: lambda d: [1, 4][d % 2],
    6: lambda d: [1, 2, 3, 6][d % 4],
    7: lambda d: (_RBT * 5 + [6])[d % 16],
    8: lambda d: (_RBT * 3 + [6])[d % 10],
    9: lambda d: [1, 2, 3, 0][d % 4],
    # 5b_lyrics: 9 layers of row/column/previous, then 7 cycles ending in cross-attention
    10: lambda d: (_RBT * 3 + (_RBT * 3 + [6]) * 7)[d % 79],
    11: lambda d: [6, 6, 0][d % 3] if d % 16 == 15 else _RBT[d % 3],
    # 1b_lyrics: prime attention at 15, 31, 63 and dense at 47
    12: lambda d: [7, 7, 0][d % 3] if d % 16 == 15 else _RBT[d % 3],
}


def layer_patterns(attn_order: int, depth: int) -> list[str]:
    """Pattern name of every layer for an ``attn_order`` of the original."""
    if attn_order not in _ORDERS:
        raise ValueError(f"attn_order {attn_order} is not supported (supported: {sorted(_ORDERS)})")
    return [ATTN_FUNC_PATTERNS[_ORDERS[attn_order](d)] for d in range(depth)]


AttentionFn = Callable[..., torch.Tensor]
_BACKENDS: dict[str, tuple[AttentionFn, Callable[[torch.Tensor], bool]]] = {}
_forced: str | None = None


def register_backend(name: str, fn: AttentionFn, supports: Callable[[torch.Tensor], bool]) -> None:
    """Add a backend with ``factored_attention_reference``'s signature; ``supports(q)`` says
    whether it can take these inputs (device, dtype) under ``auto``."""
    _BACKENDS[name] = (fn, supports)


def set_backend(name: str | None) -> None:
    """Force a backend for every call (``None`` or ``"auto"``: pick per call)."""
    global _forced
    if name not in (None, "auto", "reference") and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: reference, {', '.join(_BACKENDS)}")
    _forced = None if name == "auto" else name


def backend_name() -> str:
    """The backend asked for: ``set_backend``'s, else ``FASTJUKEBOX_ATTENTION``, else ``"auto"``."""
    return _forced or os.environ.get("FASTJUKEBOX_ATTENTION", "auto")


def _choose(q: torch.Tensor) -> AttentionFn:
    name = backend_name()
    if name == "reference":
        return factored_attention_reference
    if name != "auto":
        if name not in _BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}")
        return _BACKENDS[name][0]
    for fn, supports in _BACKENDS.values():
        if supports(q):
            return fn
    return factored_attention_reference


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, block_len: int | None = None,
           causal: bool = True, prime_len: int | None = None) -> torch.Tensor:
    """Factored attention, ``[B, T, H, D]`` in and out (see the reference for the patterns)."""
    return _choose(q)(q, k, v, pattern, block_len=block_len, causal=causal, prime_len=prime_len)


_DECODE_BACKENDS: dict[str, tuple[AttentionFn, Callable[[torch.Tensor], bool]]] = {}


def register_decode_backend(name: str, fn: AttentionFn, supports: Callable[[torch.Tensor], bool]) -> None:
    """Like ``register_backend``, for ``decode_attention_reference``'s signature."""
    _DECODE_BACKENDS[name] = (fn, supports)


def attend_cached(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pattern: str, pos: int,
                  block_len: int, prime_len: int | None = None) -> torch.Tensor:
    """Queries at ``[pos, pos + T)`` (one block) against a layer's static cache."""
    fn = decode_attention_reference
    if _DECODE_BACKENDS or _forced:
        name = backend_name()
        if name == "auto":
            fn = next((f for f, ok in _DECODE_BACKENDS.values() if ok(q)), fn)
        elif name != "reference" and name in _DECODE_BACKENDS:
            fn = _DECODE_BACKENDS[name][0]
    return fn(q, k_cache, v_cache, pattern, pos, block_len, prime_len)


def _register_gpu_kernels() -> None:
    """The Triton kernels serve CUDA tensors under ``auto``; the references everything else.
    Triton is imported only when CUDA is present (on CPU it would need its interpreter)."""
    if not torch.cuda.is_available():
        return
    try:
        from kernels.factored_attention.ops import factored_attention, supports
    except ImportError:   # no triton: the references serve CUDA too
        return
    register_backend("triton", factored_attention, supports)
    try:
        from kernels.decode_attention.ops import decode_attention, supports as decode_supports
    except ImportError:
        return
    register_decode_backend("triton", decode_attention, decode_supports)


_register_gpu_kernels()
