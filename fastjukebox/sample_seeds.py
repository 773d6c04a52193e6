"""Random streams per sample: a run's seed and a sample's index give that sample its own
generator, so the sample's draws do not depend on which other samples share its batch or its
process (``accelerate launch`` splits a run's samples over processes).

Sample 0 of a run uses the run's seed itself, so a one-sample run draws what it drew with a
single generator.
"""
from __future__ import annotations

from typing import Sequence

import torch

from kernels.sampling.reference import exponential_noise

__all__ = ["sample_seed", "SampleGenerators"]

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
        n, v = shape
        if n != len(self.generators):
            raise ValueError(f"{n} rows but {len(self.generators)} sample generators")
        return torch.cat([exponential_noise((1, v), device, g) for g in self.generators])
