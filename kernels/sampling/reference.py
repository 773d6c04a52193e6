"""Categorical sampling from logits, in plain PyTorch (the semantics the kernel reproduces).

``probs = softmax(filter_logits(logits.float() / temperature, top_k, top_p))`` (temperature 0: all
mass on the argmax, i.e. greedy) and the token is
``argmax(probs / E)`` with ``E ~ Exp(1)`` per (row, token): an exact categorical draw (the
exponential race). ``E = -log(U)`` with ``U`` uniform on the fp32 grid of ``[0, 1)``: E is never 0,
so a filtered token (probability 0) can never win; a token whose U is 0 (probability 2^-24)
cannot win either, the only departure from Exp(1). (``Tensor.exponential_`` on the CPU costs
about 15 ns per number, four times ``uniform_`` + ``log_``; at batch 16 over 256 bins that was a
twentieth of a sampling step.)

This module depends on torch alone, like the other ``kernels/*/reference.py``, so the sampler can
import it; it computes what ``fastjukebox.sampling`` computes (tested).
"""
from __future__ import annotations

import torch

__all__ = ["filter_logits", "sampling_probs", "categorical_draw", "race_winner", "sample_logits_reference",
           "exponential_noise", "exponential_noise_"]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every logit below the ``top_k``-th largest (ties kept) and/or outside the
    smallest most-likely prefix whose probability exceeds ``top_p`` (the first token past the
    threshold is kept). (N, V) -> (N, V)."""
    if top_k:
        kth = torch.topk(logits, min(int(top_k), logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = torch.zeros_like(cum, dtype=torch.bool)
        drop[..., 1:] = cum[..., :-1] > top_p          # sorted position i goes iff cum[i - 1] > top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """The distribution ``sample_logits_reference`` draws from: ``softmax(filter_logits(logits.float()
    / temperature))`` over the last dimension (any leading dimensions). Temperature 0 is the limit:
    all mass on the argmax of the filtered logits (greedy; the first of tied maxima)."""
    if temperature == 0:
        logits = filter_logits(logits.float(), top_k, top_p)
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)


def exponential_noise_(out: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``out`` (fp32) in place with Exp(1) noise ``-log(U)`` (module docstring) and return it."""
    return out.uniform_(generator=generator).log_().neg_()


def exponential_noise(shape: tuple[int, ...], device: torch.device | str,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Exp(1) noise of ``shape`` fp32, drawn as ``fastjukebox.sampling.sample_logits`` draws it (same
    generator, shape and dtype: the same numbers)."""
    return exponential_noise_(torch.empty(shape, dtype=torch.float32, device=device), generator)


def categorical_draw(probs: torch.Tensor, generator: torch.Generator | None = None,
                     noise: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """One categorical draw per row of ``probs`` (``(..., V)``, non-negative, need not sum to 1)
    -> ids ``(...)``: the exponential race ``argmax(probs / E)``, ``E`` the given ``noise``
    (same shape) or Exp(1) drawn from ``generator``. Every sampler of the project draws through
    this function (the fused kernel computes the same race from the same noise).

    ``inplace``: divide ``probs`` by the noise in place (for callers that own ``probs`` and need
    them no more: one allocation fewer). On the CPU the index is ``max``'s, the first of tied
    maxima as ``argmax``'s (the same ids; ``max`` is the faster reduction there)."""
    e = exponential_noise(tuple(probs.shape), probs.device, generator) if noise is None else noise
    return race_winner(probs.div_(e) if inplace else probs / e)


def race_winner(race: torch.Tensor, out: torch.Tensor | None = None,
                values: torch.Tensor | None = None) -> torch.Tensor:
    """The winner of an exponential race: the index of each row's largest entry (the first of ties),
    written into ``out`` when given (a (...) long view of a token buffer works). With
    ``race = logits - log E`` it is ``categorical_draw(softmax(logits), noise=E)``'s id (``log`` is
    increasing and the softmax's normaliser is shared by the row): for callers that draw from
    unfiltered logits, or have folded ``-log E`` into a bias. ``max``'s indices on the CPU (the
    faster reduction there; ``values``, a buffer like ``out`` in ``race``'s dtype, takes its maxima
    for a caller that draws in a loop), ``argmax`` elsewhere."""
    if race.device.type == "cpu":
        if out is None:
            return race.max(dim=-1).indices
        if values is None:
            values = torch.empty(out.shape, dtype=race.dtype)
        torch.max(race, -1, out=(values, out))
        return out
    return race.argmax(dim=-1) if out is None else torch.argmax(race, -1, out=out)


def sample_logits_reference(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                            generator: torch.Generator | None = None,
                            noise: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``(N, V)`` -> sampled ids ``(N,)`` long; ``noise``: ``(N, V)`` Exp(1) draws to use
    instead of drawing from ``generator``."""
    return categorical_draw(sampling_probs(logits, temperature, top_k, top_p), generator, noise)
