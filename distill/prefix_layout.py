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

The layers are the teacher's ``ResAttnBlock`` modules; only the attention pattern's key set is
cut, through ``fastjukebox.attention.attend`` (``causal=False``): prefix queries run the
pattern over the prefix alone, and the other queries run it over the whole window (their
queries placed after zero queries at the prefix positions, whose outputs are dropped).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastjukebox.attention import attend
from fastjukebox.transformer import ResAttnBlock, Transformer

__all__ = ["PrefixCache", "encode_prefix", "suffix_forward", "full_forward", "check_prefix_len"]


def check_prefix_len(prefix_len, n_ctx: int) -> int:
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or not 0 <= prefix_len < n_ctx:
        raise ValueError(f"prefix_len must be an integer in [0, n_ctx={n_ctx}), got {prefix_len!r}")
    return prefix_len


@dataclass
class PrefixCache:
    """Keys and values ``[N, P, H, D]`` of the known prefix, one pair per layer."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def prefix_len(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


def _attend_after_prefix(layer: ResAttnBlock, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Queries ``q`` at positions ``[P, T)`` against keys / values of the whole window ``[0, T)``
    under the layer's bidirectional pattern."""
    attn = layer.attn
    P = k.shape[1] - q.shape[1]
    if P:
        q = torch.cat([q.new_zeros(q.shape[0], P, *q.shape[2:]), q], dim=1)
    a = attend(q, k, v, attn.pattern, block_len=attn.block_len, causal=False, prime_len=attn.prime_len)
    return a[:, P:]


def _layer_prefix(layer: ResAttnBlock, x: torch.Tensor):
    """A layer over the prefix alone: (output, k, v)."""
    attn = layer.attn
    q, k, v = attn.project_qkv(layer.ln_0(x))
    a = attend(q, k, v, attn.pattern, block_len=attn.block_len, causal=False, prime_len=attn.prime_len)
    return layer.residual(x, attn.project_out(a)), k, v


def _layer_suffix(layer: ResAttnBlock, x: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor):
    """A layer over positions ``[P, T)`` given the prefix's keys and values."""
    attn = layer.attn
    q, k, v = attn.project_qkv(layer.ln_0(x))
    a = _attend_after_prefix(layer, q, torch.cat([k_prefix, k], dim=1), torch.cat([v_prefix, v], dim=1))
    return layer.residual(x, attn.project_out(a))


def _check_layers(transformer: Transformer) -> None:
    for layer in transformer._attn_mods:
        if layer.attn.pattern == "cross":
            raise ValueError("the prefix layout has no cross-attention (students have no lyric encoder)")


def encode_prefix(transformer: Transformer, x_prefix: torch.Tensor) -> PrefixCache:
    """Run the prefix ``x_prefix [N, P, W]`` (its input embeddings) once; returns its cache."""
    _check_layers(transformer)
    keys, values = [], []
    x = x_prefix
    for layer in transformer._attn_mods:
        x, k, v = _layer_prefix(layer, x)
        keys.append(k)
        values.append(v)
    return PrefixCache(keys, values)


def suffix_forward(transformer: Transformer, x_suffix: torch.Tensor, cache: PrefixCache) -> torch.Tensor:
    """Hidden states ``[N, T - P, W]`` of positions ``[P, T)`` from their input embeddings and
    the prefix cache (``P = cache.prefix_len``)."""
    _check_layers(transformer)
    x = x_suffix
    for layer, k, v in zip(transformer._attn_mods, cache.keys, cache.values):
        x = _layer_suffix(layer, x, k, v)
    return x


def full_forward(transformer: Transformer, x: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Hidden states ``[N, T, W]`` of the whole window under the layout with prefix length
    ``prefix_len`` (0: the plain bidirectional transformer)."""
    if prefix_len == 0:
        return transformer(x, None, causal=False)
    _check_layers(transformer)
    P = prefix_len
    for layer in transformer._attn_mods:
        attn = layer.attn
        q, k, v = attn.project_qkv(layer.ln_0(x))
        a_prefix = attend(q[:, :P], k[:, :P], v[:, :P], attn.pattern, block_len=attn.block_len, causal=False,
                          prime_len=attn.prime_len)
        a_suffix = _attend_after_prefix(layer, q[:, P:], k, v)
        x = layer.residual(x, attn.project_out(torch.cat([a_prefix, a_suffix], dim=1)))
    return x
