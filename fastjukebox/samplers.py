"""Window samplers: the interface a level's sampler implements and the registry of samplers by name.

A window sampler fills one window of a level (``WindowSampler``); ``sample_levels`` calls one per
window. The registry maps a sampler's name to a factory ``factory(jb, level, **options)`` that
builds the level's window sampler, or to None for exact autoregressive sampling
(``fastjukebox.sampling.ARWindowSampler``). Built in: ``"ar"`` and ``"ar-graph"`` (the same tokens
through the device-position step of ``fastjukebox.fast_decode``: CUDA graphs on CUDA).
Extensions add theirs through ``register_sampler`` (``fastjukebox.plugins``: the project's
``distill`` adds ``"parallel"`` and ``"speculative"``, which use the student stored beside the
level's prior).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

__all__ = ["WindowSampler", "SAMPLERS", "STUDENT_SAMPLERS", "register_sampler"]


class WindowSampler(Protocol):
    """What ``sample_levels`` calls to fill a window of a level.

    ``known`` (N, K) codes are kept, ``n_new`` more are sampled after them; ``upper``: the codes
    of the level above under the window (upsamplers), ``labels``: the window's label rows. Returns
    the window's (N, K + n_new) codes. ``on_progress(k)`` is told about ``k`` more positions
    decided in every row. ``per_sample_generators``: the sampler takes ``SampleGenerators`` (one
    generator per row) as ``generator``; without it, ``sample_levels`` calls it row by row when
    every sample has its own seed."""

    per_sample_generators: bool

    def __call__(self, known: torch.Tensor, n_new: int, upper: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, *, temperature: float, top_k: int, top_p: float,
                 chunk_size: int, generator, on_progress: Callable[[int], None] | None) -> torch.Tensor: ...


def _graph_sampler(jb, level: int, **_):
    from .fast_decode import GraphWindowSampler
    return GraphWindowSampler(jb.prior(level))


#: name -> factory(jb, level, **options) building the level's ``WindowSampler``, or None for
#: exact autoregressive sampling
SAMPLERS = {"ar": None, "ar-graph": _graph_sampler}
STUDENT_SAMPLERS: set[str] = set()   # need a student: upsampler levels only


def register_sampler(name: str, factory, *, needs_student: bool = False) -> None:
    """Make ``name`` usable as a per-level sampler (``factory(jb, level, passes=..., gamma=...)``;
    a factory takes the options it uses and ignores the others). ``needs_student``: it uses the
    level's student (``Jukebox.student``), so it serves the upsampler levels only."""
    if not isinstance(name, str) or not name or not callable(factory):
        raise ValueError(f"a sampler needs a name and a factory, got {name!r}, {factory!r}")
    SAMPLERS[name] = factory
    (STUDENT_SAMPLERS.add if needs_student else STUDENT_SAMPLERS.discard)(name)
