"""The sampling methods under comparison, each prepared for one (case, batch) window.

==================  =========================================================================
``ours``            ``fastjukebox.decoding.WindowDecoder`` (static cache, one decoder allocated
                    for the batch and reused for every window), the loop of
                    ``fastjukebox.sampling.sample_window``
``original_style``  (b) ``benchmarks.original_style.OriginalStyleSampler``: the original's step,
                    module structure, growing caches and ``Categorical`` draw
``growing_cache``   (b') ``benchmarks.baselines.GrowingCacheSampler``: only the original's cache
                    discipline (caches grown with ``torch.cat`` and re-sliced every step, weights
                    re-cast per call) in otherwise lean code
``full_recompute``  (a) ``benchmarks.baselines.sample_full_recompute``: no cache, the prefix is
                    re-run teacher-forced for every token (empty windows only)
==================  =========================================================================

``prepare`` does the untimed part of a window (conditioning; priming the case's known codes) and
returns the timed part: a callable sampling ``case.n_new`` tokens, returning them (batch, n_new).
Draws use a generator seeded from the case (the original-style method seeds the global one), so
repeated windows do identical work.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastjukebox.decoding import WindowDecoder
from fastjukebox.prior import Prior
from fastjukebox.sampling import sample_logits
from fastjukebox.settings import DEFAULT_TEMPERATURE

from .baselines import GrowingCacheSampler, sample_full_recompute
from .cases import SamplingCase, window_inputs
from .original_style import OriginalStyleSampler

METHODS = ("ours", "original_style", "growing_cache", "full_recompute")
LABELS = {
    "ours": "ours: static cache (WindowDecoder)",
    "original_style": "(b) original-style loop",
    "growing_cache": "(b') growing cache only, lean code",
    "full_recompute": "(a) full recompute, no cache",
}
SHORT = {"ours": "ours", "original_style": "(b) original-style", "growing_cache": "(b') growing cache",
         "full_recompute": "(a) full recompute"}
# The upsamplers' default sampling temperature in the original (and in ``sample_levels``).
DEFAULT_KNOBS = dict(temperature=DEFAULT_TEMPERATURE, top_k=0, top_p=0.0)

Prepare = Callable[[], Callable[[], torch.Tensor]]


def make_method(method: str, prior: Prior, case: SamplingCase, batch: int, **knobs) -> Prepare:
    """``prepare()`` -> ``run()`` for one window of ``method`` (see the module docstring).

    State a real sampler keeps across windows (the decoder and its cache, the baseline sampler
    objects) is built here, once."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    knobs = {**DEFAULT_KNOBS, **knobs}
    upper, labels, known = window_inputs(case, batch)
    n_new, seed = case.n_new, case.seed
    device = prior.device

    def gen() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    if method == "ours":
        decoder = WindowDecoder(prior, batch)

        def prepare():
            decoder.begin(upper, labels)
            decoder.prime(known)
            g = gen()

            def run():
                for _ in range(n_new):
                    decoder.push(sample_logits(decoder.step(), generator=g, **knobs))
                return decoder.codes()[:, case.known:]
            return run
        return prepare
    if method == "full_recompute":
        if case.known:
            raise ValueError("the full-recompute baseline samples empty windows only")

        def prepare_recompute():
            cond = prior.condition(upper, labels)
            return lambda: sample_full_recompute(prior, n_new, cond, generator=gen(), **knobs)
        return prepare_recompute
    sampler = OriginalStyleSampler(prior) if method == "original_style" else GrowingCacheSampler(prior)

    def prepare():
        sampler.start(prior.condition(upper, labels), known)
        if method == "original_style":
            return lambda: sampler.sample(n_new, seed=seed, **knobs)
        g = gen()
        return lambda: sampler.sample(n_new, generator=g, **knobs)
    return prepare


def sample_all(prior: Prior, case: SamplingCase, batch: int, **knobs) -> dict[str, torch.Tensor]:
    """One window from each of the case's methods with the same knobs and seed: method -> codes."""
    return {m: make_method(m, prior, case, batch, **knobs)()() for m in case.methods}


def mismatches(codes: dict[str, torch.Tensor]) -> dict[str, int]:
    """Positions where each baseline's codes differ from ``ours`` (0 everywhere: identical)."""
    ref = codes["ours"]
    return {m: int((c != ref).sum()) for m, c in codes.items() if m != "ours"}
