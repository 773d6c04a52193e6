"""Random streams per sample: a run's seed and a sample's index give that sample its own
generator, so the sample's draws do not depend on which other samples share its batch or its
process (``accelerate launch`` splits a run's samples over processes).

Sample 0 of a run uses the run's seed itself, so a one-sample run draws what it drew with a
single generator.
"""
from __future__ import annotations

from typing import Sequence

import torch

from kernels.sampling.reference import exponential_noise_

__all__ = ["sample_seed", "SampleGenerators", "fill_rows"]

SEED_STRIDE = 0x9E3779B97F4A7C15   # odd, so distinct indices give distinct seeds modulo 2**64


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a run seeded ``seed``."""
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    return seed if index == 0 else (seed + index * SEED_STRIDE) % 2**64


class SampleGenerators:
    """One ``torch.Generator`` per sample (row of a batch); slicing keeps the same generators."""

    def __init__(self, seeds: Sequence[int] = (), device: torch.device | str = "cpu", *,
                 generators: Sequence[torch.Generator] | None = None):
        if generators is None:
            generators = [torch.Generator(device=device) for _ in seeds]
            for g, s in zip(generators, seeds):
                g.manual_seed(int(s))
        self.generators = list(generators)

    def __len__(self) -> int:
        return len(self.generators)

    def __getitem__(self, rows: slice) -> "SampleGenerators":
        return SampleGenerators(generators=self.generators[rows])

    def exponential_noise(self, shape: tuple[int, int], device: torch.device | str) -> torch.Tensor:
        """Exp(1) noise ``(N, V)``, row ``i`` drawn from generator ``i`` (the numbers a batch of one
        draws from it)."""
        return fill_rows(torch.empty(shape, dtype=torch.float32, device=device), self, exponential_noise_)


def fill_rows(out: torch.Tensor, generator, fill) -> torch.Tensor:
    """``out`` filled in place by ``fill(view, generator)`` and returned: with ``SampleGenerators``,
    row ``i`` (first dimension) from generator ``i``, so each row holds what a batch of that row
    alone would draw; else the whole tensor from ``generator`` (a ``torch.Generator`` or None)."""
    if not isinstance(generator, SampleGenerators):
        fill(out, generator)
        return out
    if out.shape[0] != len(generator):
        raise ValueError(f"{out.shape[0]} rows but {len(generator)} sample generators")
    for i, g in enumerate(generator.generators):
        fill(out[i:i + 1], g)
    return out
