"""The mask schedule of the parallel students: one source for training and sampling.

A masked-token student is trained on windows in which a fraction ``mask_ratio(r)`` of the
positions is hidden, ``r ~ U(0, 1)``; the sampler decodes a window in ``K`` passes and, after
pass ``k``, leaves about ``n * mask_ratio(k / K)`` positions masked. Using the same function for
both keeps the masking rates seen in training equal to the ones met while sampling (MaskGIT,
Chang et al. 2022; SoundStorm, Borsos et al. 2023).
"""
from __future__ import annotations

import math

import torch

__all__ = ["mask_ratio", "masks_per_pass", "pass_temperature", "sample_training_mask_ratio",
           "sample_training_mask", "spread_order"]


def mask_ratio(r: float | torch.Tensor) -> float | torch.Tensor:
    """Cosine schedule ``cos(pi/2 * r)``: fraction still masked at progress ``r`` in [0, 1]
    (1 at ``r = 0``, 0 at ``r = 1``). Takes a float or a tensor of any shape."""
    if torch.is_tensor(r):
        return torch.cos(0.5 * math.pi * r)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"schedule progress r must be in [0, 1], got {r}")
    return math.cos(0.5 * math.pi * r)


def masks_per_pass(n: int, passes: int) -> list[int]:
    """How many of ``n`` positions stay masked after each of ``passes`` passes.

    Entry ``k - 1`` is ``floor(n * mask_ratio(k / passes))``, moved just enough that every pass
    unmasks at least one position and the remaining passes can each still unmask one: the list
    is strictly decreasing, starts below ``n`` and ends at 0. Needs ``1 <= passes <= n``.
    """
    n, passes = int(n), int(passes)
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if n < passes:
        raise ValueError(f"cannot unmask {n} positions in {passes} passes (each pass unmasks at least one); "
                         f"use at most {n} passes")
    out, prev = [], n
    for k in range(1, passes + 1):
        target = math.floor(n * mask_ratio(k / passes) + 1e-9)  # 1e-9: cos(pi/2) is 6e-17, not 0
        m = min(max(target, passes - k), prev - 1)
        out.append(m)
        prev = m
    return out


def pass_temperature(t0: float, pass_index: int, passes: int) -> float:
    """Sampling temperature of pass ``pass_index`` (0-based) of ``passes``: ``t0`` at the first
    pass, falling linearly towards 0 (``t0 * (passes - pass_index) / passes``), so that the last,
    most constrained passes sample close to greedily."""
    if passes < 1 or not 0 <= pass_index < passes:
        raise ValueError(f"pass_index must be in [0, {passes}), got {pass_index}")
    if t0 < 0:
        raise ValueError(f"temperature must be >= 0, got {t0}")
    return float(t0) * (passes - pass_index) / passes


def spread_order(n: int) -> list[int]:
    """A permutation of ``range(n)`` whose every prefix is spread evenly over ``[0, n)``: offsets
    sorted by the bit-reversal of their index (the van der Corput sequence: 0, n/2, n/4, 3n/4,
    ...), so the first ``m`` entries lie about ``n / m`` apart for every ``m``. Decoding a window
    in this order, a pass's positions are far from each other and every later position sits
    between positions decoded before it."""
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    bits = max(1, (n - 1).bit_length())

    def reversed_bits(i: int) -> int:
        return int(format(i, f"0{bits}b")[::-1], 2)

    return sorted(range(n), key=reversed_bits)


def sample_training_mask_ratio(shape: int | tuple[int, ...], generator: torch.Generator | None = None,
                               device: torch.device | str | None = None) -> torch.Tensor:
    """Mask ratios for training, ``mask_ratio(r)`` with ``r ~ U(0, 1)``: float32 tensor of
    ``shape`` with values in (0, 1]."""
    if device is None and generator is not None:
        device = generator.device
    r = torch.rand(shape, generator=generator, device=device)
    return mask_ratio(r)


def sample_training_mask(batch: int, length: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Random training masks: (batch, length) bool, True where the token is hidden.

    Row ``i`` hides ``clamp(ceil(ratio_i * length), 1, length)`` positions chosen uniformly, with
    ``ratio_i`` from ``sample_training_mask_ratio`` (at least one, so every row has a loss).
    Sync-free: ranks of random scores are compared with the per-row count on the device.
    """
    if batch < 1 or length < 1:
        raise ValueError(f"batch and length must be >= 1, got {batch} and {length}")
    if device is None and generator is not None:
        device = generator.device
    ratio = sample_training_mask_ratio((batch, 1), generator, device)
    count = torch.ceil(ratio * length).clamp(1, length).long()                  # (batch, 1)
    scores = torch.rand(batch, length, generator=generator, device=device)
    ranks = scores.argsort(dim=1).argsort(dim=1)                                 # uniform permutation
    return ranks < count
