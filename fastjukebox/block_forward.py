"""The residual block's arithmetic, written once for every way the prior's layers run.

A block maps its input ``x`` to ``x + a + m`` with ``a = attn(ln_0(x))`` and
``m = mlp(ln_1(x + a))`` (``x + s (a + m)`` with ``res_scale = s``). What differs between a
teacher-forced pass, priming a cache, one sampled token, a speculative verify chunk, a step with
its position on the device and a parallel student's prefix-cached layout is only *which keys a
query sees and where new keys go*. That part is an ``attention`` callable; everything else is
``block_forward``:

    a = attention(L, h)          # h = ln_0(x) as rows (R, W) -> (R, n_state), or None (no key visible)

where ``L`` is the block's ``BlockWeights`` (tensors read once from its modules). The
arithmetic is laid out for few tensor operations, since a one-token step on a CPU costs its
operation count more than its arithmetic:

* one ``layer_norm`` per norm (fp32 statistics for half-precision activations, as the original);
* ``quick_gelu(y) = y * sigmoid(1.702 y)`` evaluated as ``silu(1.702 y) / 1.702`` with both
  scalings inside the neighbouring ``addmm`` calls, so the MLP is ``addmm``, ``silu_``, ``addmm``;
* the residual add in place on the fresh MLP output where the dtypes agree (under autocast they
  may not: the residual stream then keeps its own dtype).

The rewrites are exact in real arithmetic; in float64 they agree with the original's order of
operations to rounding (the fixtures' parity tests hold at 1e-10).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .layers import QUICK_GELU_SCALE

__all__ = ["BlockWeights", "Attention", "block_forward", "encoder_keys", "layer_norm", "layer_table"]

_HALF = (torch.float16, torch.bfloat16)


class BlockWeights:
    """The tensors and constants of one ``ResAttnBlock`` (views of its parameters).

    ``w_qkv``/``b_qkv`` is the whole input projection (the query alone for ``cross`` layers);
    ``w_q``/``w_kv`` its query and key/value column ranges (keys first, then values);
    ``w_enc``/``b_enc`` project the lyric encoder's states to keys/values of ``cross`` layers."""

    __slots__ = ("index", "pattern", "heads", "head_dim", "n_state", "block_len", "prime_len", "res_scale",
                 "ln_0", "ln_1", "w_qkv", "b_qkv", "w_q", "b_q", "w_kv", "b_kv", "w_enc", "b_enc",
                 "w_proj", "b_proj", "w_fc", "b_fc", "w_out", "b_out")

    def __init__(self, block, index: int = 0) -> None:
        attn, mlp = block.attn, block.mlp
        self.index, self.pattern = index, attn.pattern
        self.heads, self.head_dim, self.n_state = attn.heads, attn.head_dim, attn.n_state
        self.block_len, self.prime_len, self.res_scale = attn.block_len, attn.prime_len, block.res_scale
        self.ln_0, self.ln_1 = _norm_args(block.ln_0), _norm_args(block.ln_1)
        E = attn.n_state
        self.w_qkv, self.b_qkv = attn.c_attn.w, attn.c_attn.b
        self.w_q, self.b_q = self.w_qkv[:, :E], self.b_qkv[:E]
        self.w_kv, self.b_kv = self.w_qkv[:, E:], self.b_qkv[E:]
        enc = getattr(attn, "c_enc_kv", None)
        self.w_enc, self.b_enc = (enc.w, enc.b) if enc is not None else (None, None)
        self.w_proj, self.b_proj = attn.c_proj.w, attn.c_proj.b
        self.w_fc, self.b_fc = mlp.c_fc.w, mlp.c_fc.b
        self.w_out, self.b_out = mlp.c_proj.w, mlp.c_proj.b


def _norm_args(ln) -> tuple:
    """(shape, weight, bias, eps, half): half-precision weights normalise in fp32 with fp32 parameters."""
    half = ln.weight.dtype in _HALF
    w, b = (ln.weight.float(), ln.bias.float()) if half else (ln.weight, ln.bias)
    return ln.normalized_shape, w, b, ln.eps


def layer_norm(x: torch.Tensor, args: tuple) -> torch.Tensor:
    shape, w, b, eps = args
    if x.dtype in _HALF:
        return F.layer_norm(x.float(), shape, w, b, eps).to(x.dtype)
    return F.layer_norm(x, shape, w, b, eps)


def layer_table(transformer) -> list[BlockWeights]:
    """``BlockWeights`` of every block of a ``Transformer``, indexed by layer."""
    return [BlockWeights(block, i) for i, block in enumerate(transformer._attn_mods)]


def encoder_keys(L: BlockWeights, encoder_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[N, S, H, D]`` of a ``cross`` layer from the lyric encoder's states
    ``[N, S, W]`` (in the weights' dtype)."""
    N, S, W = encoder_kv.shape
    kv = torch.addmm(L.b_enc, encoder_kv.reshape(N * S, W), L.w_enc).view(N, S, 2, L.heads, L.head_dim)
    return kv[:, :, 0], kv[:, :, 1]


Attention = Callable[[BlockWeights, torch.Tensor], Optional[torch.Tensor]]


def block_forward(L: BlockWeights, x: torch.Tensor, attention: Attention,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """One residual block over rows ``x: (R, W)`` -> ``(R, W)``; ``attention(L, ln_0(x))`` gives the
    attention output before its output projection, ``(R, n_state)``, or None where no key is
    visible (the output projection is then its bias). With ``rows`` ((S,) long indices into the
    R rows) the block's output at those rows only, ``(S, W)``: attention still runs over every row
    (each is a key and value), the output projection, MLP and norms at ``rows`` alone (each row's
    arithmetic is its own: the same numbers as the full block's rows)."""
    a = attention(L, layer_norm(x, L.ln_0))
    if rows is not None:
        x = x.index_select(0, rows)
        a = None if a is None else a.index_select(0, rows)
    a = L.b_proj.expand(x.shape[0], -1) if a is None else torch.addmm(L.b_proj, a, L.w_proj)
    xa = x + a
    m = torch.addmm(L.b_fc, layer_norm(xa, L.ln_1), L.w_fc, beta=QUICK_GELU_SCALE, alpha=QUICK_GELU_SCALE)
    m = torch.addmm(L.b_out, F.silu(m, inplace=True), L.w_out, alpha=1.0 / QUICK_GELU_SCALE)
    if L.res_scale != 1.0:
        return x + L.res_scale * (a + m)
    return m.add_(xa) if m.dtype == xa.dtype else xa + m
