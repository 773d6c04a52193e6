"""The prefix-cached attention layout of a parallel student.

In every upsampler window after a level's first, the first ``P`` positions (the overlap with
the previous window) are known. Under this layout

* a known-prefix position ``i < P`` attends only to prefix keys ``j < P`` (its layer's factored
  pattern, bidirectional, restricted to the prefix: the prefix is self-contained), and
* every other position ``i >= P`` (unknown, or masked padding) attends to every key its
  pattern allows, prefix and unknown alike (bidirectional).

The prefix's hidden states, keys and values then depend on the prefix codes and the
conditioning alone, so they are computed once per window (``encode_prefix``: a static cache,
as the autoregressive sampler's) and every decoding pass runs only positions ``[P, n_ctx)``
against them (``suffix_forward``). ``full_forward`` computes the same layout over the whole
window in one call (training, and the reference the cache is tested against); with ``P = 0``
it is the plain bidirectional transformer.

Each layer is the teacher's residual block (``fastjukebox.block_forward``); only the attention
pattern's key set is cut, through ``fastjukebox.attention.attend`` (``causal=False``): prefix
queries run the pattern over the prefix alone, and the other queries run it over the whole
window (their queries placed after zero queries at the prefix positions, whose outputs are
dropped).

On the CPU, where the prefix (and so the window) ends on a block boundary, the block-local
patterns run as single ``scaled_dot_product_attention`` calls on views of the queries, keys and
values (``_block_local``): a block layer is attention within each block, a previous-block layer
attention of each block to the keys of the block before it, a transpose layer attention of each
column's queries to that column (the column index folded into the heads). They are the same
softmax-weighted sums as ``attend`` computes (the same numbers to rounding: float64 parity with
``full_forward`` is tested), without its block reshapes, copies and masks. Elsewhere, and on
other devices (the registered kernels), every layer goes through ``attend``.

``suffix_forward(..., rows=...)`` computes the last layer's attention output, MLP and norms only
at the rows asked for (every row is still a key and value of that layer): a pass that scores
only the positions still masked runs the rest of its last layer on those alone; a prefix's last
layer runs only as far as its keys and values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastjukebox.attention import attend
from fastjukebox.block_forward import BlockWeights, block_forward, layer_norm, layer_table
from fastjukebox.transformer import Transformer

__all__ = ["PrefixCache", "encode_prefix", "suffix_forward", "full_forward", "check_prefix_len"]


def check_prefix_len(prefix_len, n_ctx: int) -> int:
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or not 0 <= prefix_len < n_ctx:
        raise ValueError(f"prefix_len must be an integer in [0, n_ctx={n_ctx}), got {prefix_len!r}")
    return prefix_len


@dataclass
class PrefixCache:
    """Keys and values ``[N, P, H, D]`` of the known prefix, one pair per layer; ``suffix_inputs``:
    the part of the later positions' input embeddings that does not depend on their codes (their
    position embeddings and conditioning, summed once per window by the student's
    ``encode_prefix``), or None."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    suffix_inputs: torch.Tensor | None = None

    @property
    def prefix_len(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


def _qkv(L: BlockWeights, h: torch.Tensor, N: int):
    """Queries, keys and values ``[N, T, H, D]`` of the rows ``h: (N * T, W)``."""
    return torch.addmm(L.b_qkv, h, L.w_qkv).view(N, -1, 3, L.heads, L.head_dim).unbind(2)


def _attend(L: BlockWeights, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The layer's bidirectional pattern; queries at the last ``q.shape[1]`` positions of the keys'
    window (placed after zero queries at the positions before them, whose outputs are dropped)."""
    P = k.shape[1] - q.shape[1]
    if P:
        q = torch.cat([q.new_zeros(q.shape[0], P, *q.shape[2:]), q], dim=1)
    a = attend(q, k, v, L.pattern, block_len=L.block_len, causal=False, prime_len=L.prime_len)
    return a[:, P:]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention of ``q [B, Tq, G, D]`` to ``k``, ``v [B, Tk, G, D]`` (any strides with
    the last dimension contiguous: views go in without a copy) -> ``[B, Tq, G, D]``, for each of
    the ``G`` groups (heads) apart; scale ``1 / sqrt(D)``."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, C: int) -> torch.Tensor:
    """Each block of ``C`` queries of ``q [N, T, H, D]`` (``T % C == 0``) attends to the block of
    ``k``, ``v`` at the same place -> ``[N, T, H, D]``."""
    N, T, H, D = q.shape
    a = _sdpa(*(x.reshape(N * (T // C), C, H, D) for x in (q, k, v)))
    return a.reshape(N, T, H, D)


def _columns(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, C: int) -> torch.Tensor:
    """Each query of ``q [N, Tq, H, D]`` attends to the keys of ``k``, ``v [N, Tk, H, D]`` in its
    column (same index modulo ``C``; ``Tq``, ``Tk`` whole blocks, the queries' blocks aligned with
    the keys' last ones) -> ``[N, Tq, H, D]``. The column index joins the heads: one attention of
    ``C * H`` groups over the blocks."""
    N, Tq, H, D = q.shape
    a = _sdpa(*(x.reshape(N, x.shape[1] // C, C * H, D) for x in (q, k, v)))
    return a.reshape(N, Tq, H, D)


def _block_local(L: BlockWeights, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kp: torch.Tensor | None = None, vp: torch.Tensor | None = None) -> torch.Tensor | None:
    """``_attend`` (``kp`` None: the rows are the prefix, attending within it) or ``_attend_suffix``
    (queries after the prefix's ``kp``, ``vp``) through ``_blocks`` / ``_columns``, or None where
    that does not apply: another device (the registered kernels serve it), another pattern, or a
    prefix or window that does not end on a block boundary."""
    C = L.block_len
    if q.device.type != "cpu" or not C or L.pattern not in ("block", "prev_block", "transpose"):
        return None
    P, Tq = (0, q.shape[1]) if kp is None else (kp.shape[1], q.shape[1])
    if P % C or Tq % C:
        return None
    if L.pattern == "block":
        return _blocks(q, k, v, C)
    if L.pattern == "transpose":
        if kp is not None:
            k, v = torch.cat([kp, k], dim=1), torch.cat([vp, v], dim=1)
        return _columns(q, k, v, C)
    # prev_block: block b reads block b - 1, all of it; the window's block 0 reads zero keys and
    # values (its output is exactly 0)
    if kp is None:
        if Tq == C:
            return torch.zeros_like(q)
        return torch.cat([q.new_zeros(q.shape[0], C, *q.shape[2:]), _blocks(q[:, C:], k[:, :-C], v[:, :-C], C)], dim=1)
    return _blocks(q, torch.cat([kp[:, P - C:], k[:, :Tq - C]], dim=1), torch.cat([vp[:, P - C:], v[:, :Tq - C]], dim=1), C)


def _attend_suffix(L: BlockWeights, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   kp: torch.Tensor, vp: torch.Tensor) -> torch.Tensor:
    """``_attend`` for queries at positions ``[P, T)`` with keys/values ``k``, ``v`` there and the
    prefix's ``kp``, ``vp`` (``P = kp.shape[1]``). Where the prefix ends on a block boundary the
    block-local patterns run over the keys they can see only: a block layer over the suffix's own
    blocks, a previous-block layer from the prefix's last block on, and (whole blocks throughout) a
    transpose layer as attention of each column's suffix queries to that whole column; any
    other case pays for zero queries at the prefix positions."""
    P, T, C = kp.shape[1], kp.shape[1] + k.shape[1], L.block_len
    if C and P % C == 0:
        if L.pattern == "block":
            return attend(q, k, v, "block", block_len=C, causal=False)
        if L.pattern == "prev_block":
            return _attend(L, q, torch.cat([kp[:, P - C:], k], dim=1), torch.cat([vp[:, P - C:], v], dim=1))
        if L.pattern == "transpose" and T % C == 0:
            N, Tq, H, D = q.shape

            def columns(x):     # [N, n * C, H, D] -> [N * C, n, H, D]: one row per column
                return x.unflatten(1, (-1, C)).transpose(1, 2).reshape(N * C, -1, H, D)

            a = attend(columns(q), columns(torch.cat([kp, k], dim=1)), columns(torch.cat([vp, v], dim=1)), "cross")
            return a.view(N, C, Tq // C, H, D).transpose(1, 2).reshape(N, Tq, H, D)
    return _attend(L, q, torch.cat([kp, k], dim=1), torch.cat([vp, v], dim=1))


class _LayoutAttention:
    """``block_forward``'s attention under the layout, for rows of ``N`` samples:

    * ``"prefix"``: the rows are the prefix, attending within it; their keys/values are kept
      in ``keys`` / ``values`` (the cache ``encode_prefix`` returns);
    * ``"suffix"``: the rows are positions ``[P, T)``, attending to ``cache``'s prefix keys and
      to each other;
    * ``"full"``: the rows are the whole window, split at ``prefix_len``."""

    def __init__(self, N: int, mode: str, prefix_len: int = 0, cache: PrefixCache | None = None):
        self.N, self.mode, self.P, self.cache = N, mode, prefix_len, cache
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def project(self, L: BlockWeights, h: torch.Tensor):
        """Queries, keys and values of the rows ``h``; the prefix's keys and values are kept."""
        q, k, v = _qkv(L, h, self.N)
        if self.mode == "prefix":
            self.keys.append(k)
            self.values.append(v)
        return q, k, v

    def __call__(self, L: BlockWeights, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(L, h)
        if self.mode == "prefix":
            a = _block_local(L, q, k, v)
            if a is None:
                a = _attend(L, q, k, v)
        elif self.mode == "suffix":
            kp, vp = self.cache.keys[L.index], self.cache.values[L.index]
            a = _block_local(L, q, k, v, kp, vp)
            if a is None:
                a = _attend_suffix(L, q, k, v, kp, vp)
        else:
            P = self.P
            a = torch.cat([_attend(L, q[:, :P], k[:, :P], v[:, :P]), _attend(L, q[:, P:], k, v)], dim=1)
        return a.reshape(h.shape[0], L.n_state)


def _run(transformer: Transformer, x: torch.Tensor, attention: _LayoutAttention,
         rows: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, T, W]`` -> ``[N, T, W]``, or ``[N, S, W]`` at ``rows`` ((N, S) long, indices in [0, T));
    None for a prefix (``attention`` keeps its keys and values)."""
    N, T, W = x.shape
    layers = layer_table(transformer)
    if any(L.pattern == "cross" for L in layers):
        raise ValueError("the prefix layout has no cross-attention (students have no lyric encoder)")
    x = x.reshape(N * T, W)
    for L in layers[:-1]:
        x = block_forward(L, x, attention)
    if attention.mode == "prefix":     # the cache is all a prefix gives: its last layer's keys and values
        attention.project(layers[-1], layer_norm(x, layers[-1].ln_0))
        return None
    if rows is None:
        return block_forward(layers[-1], x, attention).view(N, T, W)
    flat = (rows + torch.arange(0, N * T, T, device=rows.device)[:, None]).reshape(-1)
    return block_forward(layers[-1], x, attention, rows=flat).view(N, rows.shape[1], W)


def encode_prefix(transformer: Transformer, x_prefix: torch.Tensor) -> PrefixCache:
    """Run the prefix ``x_prefix [N, P, W]`` (its input embeddings) once; returns its cache. Its
    last layer runs only as far as its keys and values (the prefix's outputs are never used)."""
    attention = _LayoutAttention(x_prefix.shape[0], "prefix")
    _run(transformer, x_prefix, attention)
    return PrefixCache(attention.keys, attention.values)


def suffix_forward(transformer: Transformer, x_suffix: torch.Tensor, cache: PrefixCache,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states ``[N, T - P, W]`` of positions ``[P, T)`` from their input embeddings and
    the prefix cache (``P = cache.prefix_len``); with ``rows`` ((N, S) long, indices into the
    suffix: position ``P + rows[n, s]``) only theirs, ``[N, S, W]`` (the last layer's attention
    output, MLP and norms run at those rows alone)."""
    return _run(transformer, x_suffix, _LayoutAttention(x_suffix.shape[0], "suffix", cache=cache), rows)


def full_forward(transformer: Transformer, x: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Hidden states ``[N, T, W]`` of the whole window under the layout with prefix length
    ``prefix_len`` (0: the plain bidirectional transformer)."""
    if prefix_len == 0:
        return transformer(x, None, causal=False)
    return _run(transformer, x, _LayoutAttention(x.shape[0], "full", prefix_len))
