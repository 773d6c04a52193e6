"""The one-token decode step, written with as few tensor operations per layer as the arithmetic allows.

A sampling step feeds one position through every layer. For small models and small batches its
cost is the number of tensor operations (each one a dispatch of a few microseconds on a CPU), not
their arithmetic, so this step is laid out for the fewest of them while computing exactly what
``ResAttnBlock.forward`` computes:

* one ``layer_norm`` call per norm, parameters read once at construction;
* the query projection is one ``addmm`` and the key/value projection another, written straight
  into the position's cache slot (``KVCache.slot``: key and value adjacent);
* the single query attends to the keys it may see
  (``kernels.decode_attention.reference.single_query_keys``) through PyTorch's
  ``scaled_dot_product_attention`` on CPU, and through ``attention.attend_cached`` (the Triton
  kernel on CUDA) elsewhere;
* ``quick_gelu(y) = y * sigmoid(1.702 y)`` is evaluated as ``silu(1.702 y) / 1.702`` with both
  scalings inside the neighbouring ``addmm`` calls (``alpha`` / ``beta``), so the MLP is
  ``addmm``, ``silu_``, ``addmm``;
* the residual adds are in place on fresh outputs.

The rewrites are exact in real arithmetic; in floating point they round differently from the
teacher-forced forward at the last bit (float64 parity to 1e-10 is tested).

``TokenStep(model)(x, pos, cache)`` maps the inputs ``x: (N, W)`` of position ``pos`` to the final
activations ``(N, W)`` and writes the position's keys/values into ``cache`` (a ``KVCache``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.decode_attention.reference import single_query_keys

from .attention import attend_cached
from .kv_cache import KVCache
from .layers import QUICK_GELU_SCALE

__all__ = ["TokenStep"]


class _Layer:
    """Tensors and constants of one residual block, read once from its modules."""

    __slots__ = ("pattern", "index", "ln_0", "ln_1", "w_q", "b_q", "w_kv", "b_kv", "w_proj", "b_proj", "w_fc", "b_fc",
                 "w_out", "b_out", "heads", "head_dim", "n_state", "block_len", "prime_len", "res_scale",
                 "fp32_norm")

    def __init__(self, index: int, block) -> None:
        attn, mlp = block.attn, block.mlp
        self.pattern, self.index = attn.pattern, index
        self.heads, self.head_dim, self.n_state = attn.heads, attn.head_dim, attn.n_state
        self.block_len, self.prime_len = attn.block_len, attn.prime_len
        self.ln_0, self.ln_1 = self._norm_args(block.ln_0), self._norm_args(block.ln_1)
        w, b, E = attn.c_attn.w, attn.c_attn.b, attn.n_state
        self.w_q, self.b_q = w[:, :E], b[:E]              # cross layers: c_attn is the query alone
        self.w_kv, self.b_kv = w[:, E:], b[E:]
        self.w_proj, self.b_proj = attn.c_proj.w, attn.c_proj.b
        self.w_fc, self.b_fc = mlp.c_fc.w, mlp.c_fc.b
        self.w_out, self.b_out = mlp.c_proj.w, mlp.c_proj.b
        self.res_scale = block.res_scale
        self.fp32_norm = w.dtype in (torch.float16, torch.bfloat16)

    @staticmethod
    def _norm_args(ln) -> tuple:
        return ln, ln.normalized_shape, ln.weight, ln.bias, ln.eps

    def norm(self, args: tuple, x: torch.Tensor) -> torch.Tensor:
        ln, shape, w, b, eps = args
        if self.fp32_norm:
            return ln.forward(x)
        return F.layer_norm(x, shape, w, b, eps)


class TokenStep:
    """The transformer of ``model`` (a ``TokenTransformer``) for one position."""

    def __init__(self, model) -> None:
        self.layers = [_Layer(i, block) for i, block in enumerate(model.transformer._attn_mods)]
        self._params = [(p, p.data_ptr()) for p in model.transformer.parameters()]
        # CPU: scaled_dot_product_attention on the visible keys; elsewhere the registered decode
        # backend (the Triton kernel on CUDA) through attend_cached.
        self.sdpa = model.x_emb.weight.device.type == "cpu"

    def stale(self) -> bool:
        """Whether the model's parameters were replaced since construction (``model.to(...)``
        swaps their storage; the views taken here would still read the old weights)."""
        return any(p.data_ptr() != ptr for p, ptr in self._params)

    def __call__(self, x: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        N = x.shape[0]
        for L in self.layers:
            h = L.norm(L.ln_0, x)
            q = torch.addmm(L.b_q, h, L.w_q)
            if L.pattern != "cross":
                slot = cache.slot(L.index, pos)
                if slot is not None:
                    torch.addmm(L.b_kv, h, L.w_kv, out=slot)
            a = self._attend(L, q.view(N, L.heads, 1, L.head_dim), cache.k[L.index], cache.v[L.index], pos)
            # nothing visible (the previous block of block 0): the projection is its bias
            a = L.b_proj.expand(N, -1) if a is None else torch.addmm(L.b_proj, a, L.w_proj)
            xa = x + a
            m = torch.addmm(L.b_fc, L.norm(L.ln_1, xa), L.w_fc, beta=QUICK_GELU_SCALE, alpha=QUICK_GELU_SCALE)
            m = torch.addmm(L.b_out, F.silu(m, inplace=True), L.w_out, alpha=1.0 / QUICK_GELU_SCALE)
            if L.res_scale == 1.0:
                x = m.add_(xa)
            else:
                x = x + L.res_scale * (a + m)
        return x

    def _attend(self, L: _Layer, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: int):
        """Attention output ``(N, n_state)`` of the single query ``q: (N, H, 1, D)``, or None when it
        sees no key."""
        N = q.shape[0]
        if not self.sdpa:
            a = attend_cached(q.transpose(1, 2), kc, vc, L.pattern, pos, L.block_len, L.prime_len)
            return a.reshape(N, L.n_state)
        kv = single_query_keys(kc, vc, L.pattern, pos, L.block_len, L.prime_len)
        if kv is None:
            return None
        k, v = kv
        return F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2)).reshape(N, L.n_state)
