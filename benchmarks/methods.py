"""The three sampling methods under comparison, as zero-argument callables for one (case, batch).

=================  ==========================================================================
``ours``           ``fastjukebox.sampling.sample_window`` with one ``WindowDecoder`` (static
                   cache) allocated for the batch and reused for every window
``full_recompute`` (a) ``benchmarks.baselines.sample_full_recompute``: no cache, the prefix is
                   re-run teacher-forced for every token
``growing_cache``  (b) ``benchmarks.baselines.GrowingCacheSampler``: per-layer caches grown with
                   ``torch.cat`` and re-sliced every step, weights re-cast per call
=================  ==========================================================================

Each call samples ``case.n_new`` tokens from an empty window (no priming), computes the window's
conditioning itself and draws with a fresh generator seeded from the case, so repeated calls do
identical work and the three methods see the same random numbers.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastjukebox.decoding import WindowDecoder
from fastjukebox.prior import Prior
from fastjukebox.sampling import sample_window

from .baselines import GrowingCacheSampler, sample_full_recompute
from .cases import SamplingCase, window_inputs

METHODS = ("ours", "full_recompute", "growing_cache")
LABELS = {
    "ours": "ours: static cache (WindowDecoder)",
    "full_recompute": "(a) full recompute, no cache",
    "growing_cache": "(b) growing cache, torch.cat",
}
# The upsamplers' default sampling temperature in the original (and in ``sample_levels``).
DEFAULT_KNOBS = dict(temperature=0.99, top_k=0, top_p=0.0)


def make_runner(method: str, prior: Prior, case: SamplingCase, batch: int,
                **knobs) -> Callable[[], torch.Tensor]:
    """A callable sampling one window of ``case.n_new`` codes, returning them (batch, n_new).

    State that a real sampler keeps across windows (the decoder and its cache, the growing-cache
    sampler object) is built here, outside the callable."""
    knobs = {**DEFAULT_KNOBS, **knobs}
    upper, labels = window_inputs(case, batch)
    n_new, seed = case.n_new, case.seed
    device = prior.prior.x_emb.weight.device

    def gen() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    if method == "ours":
        decoder = WindowDecoder(prior, batch)
        known = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return lambda: sample_window(decoder, known, n_new, upper, labels, generator=gen(), **knobs)
    if method == "full_recompute":
        return lambda: sample_full_recompute(prior, n_new, upper, labels, generator=gen(), **knobs)
    if method == "growing_cache":
        sampler = GrowingCacheSampler(prior)
        return lambda: sampler.sample(n_new, upper, labels, generator=gen(), **knobs)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def sample_all(prior: Prior, case: SamplingCase, batch: int, **knobs) -> dict[str, torch.Tensor]:
    """One window from each method with the same knobs and seed: method -> codes (batch, n_new)."""
    return {m: make_runner(m, prior, case, batch, **knobs)() for m in METHODS}


def mismatches(codes: dict[str, torch.Tensor]) -> dict[str, int]:
    """Positions where each baseline's codes differ from ``ours`` (0 everywhere: identical)."""
    ref = codes["ours"]
    return {m: int((c != ref).sum()) for m, c in codes.items() if m != "ours"}
