"""Timing-signal bins of the top-level priors.

The timing signal sums three binned embeddings: the song's total length, the absolute position of
each of the ``n_time`` window positions (interpolated from the window's start to its end), and
the same positions relative to the total length. A value ``v`` in ``[lo, hi)`` falls in bin
``floor(t_bins * (v - lo) / (hi - lo))``.

The reference does this arithmetic in float32 (values near bin edges, and lengths above 2**24
samples, round), so the bins here are computed with the same float32 tensor operations, always on
the CPU: CUDA divides by a scalar through its reciprocal, which can move a value across an edge.
"""
from __future__ import annotations

import torch

__all__ = ["time_bins", "timing_ranges"]

_F32 = torch.float32


def timing_ranges(sr: int, min_duration: float, max_duration: float
                  ) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """(total length, absolute position, relative position) ranges ``[lo, hi)``, in samples/1."""
    return ((min_duration * sr, max_duration * sr), (0.0, max_duration * sr), (0.0, 1.0))


def _check(name: str, values: torch.Tensor, lo: float, hi: float, hi_inclusive: bool,
           exact: torch.Tensor | None = None, unit: str = "") -> None:
    """Raise ValueError unless every float32 value lies in [lo, hi) (or [lo, hi])."""
    upper = values <= hi if hi_inclusive else values < hi
    bad = ~((lo <= values) & upper)
    if not bool(bad.any()):
        return
    row, col = (int(i) for i in bad.nonzero()[0])
    v = float(values[row, col])
    shown = f"{v!r}"
    if exact is not None:
        e = int(exact[row, col])
        shown = f"{e}{unit}" if float(e) == v else f"{e}{unit} ({v!r} in float32)"
    bracket = "]" if hi_inclusive else ")"
    raise ValueError(f"{name} = {shown} in row {row} is outside the allowed range "
                     f"[{lo!r}, {hi!r}{bracket}")


def _bins(start: torch.Tensor, end: torch.Tensor | None, n_time: int, t_bins: int,
          lo: float, hi: float) -> torch.Tensor:
    """Bin indices (N, n_time) of positions interpolated from ``start`` to ``end`` (N, 1)."""
    if n_time != 1:
        interpolation = torch.arange(0, n_time, dtype=_F32).view(1, n_time) / n_time
        position = start + (end - start) * interpolation
    else:
        position = start
    normalised = (position - lo) / (hi - lo)  # lo, hi stay Python floats as in the reference
    return (t_bins * normalised).floor().long()


def time_bins(y_timing: torch.Tensor, n_time: int, t_bins: int, sr: int, min_duration: float,
              max_duration: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bins of the timing signal for label rows ``[total_length, offset, sample_length, ...]``.

    ``y_timing``: integer tensor (N, >=3); only the first three columns are read.
    Returns int64 tensors on ``y_timing``'s device: total (N, 1), absolute (N, n_time) and
    relative (N, n_time). Raises ValueError when a value is outside its range (checked, as in
    the reference, after conversion to float32).
    """
    if y_timing.dim() != 2 or y_timing.shape[1] < 3:
        raise ValueError(f"expected label rows (N, >=3), got {tuple(y_timing.shape)}")
    if y_timing.is_floating_point():
        raise ValueError(f"label rows must be integers, got {y_timing.dtype}")
    device = y_timing.device
    y = y_timing[:, :3].to("cpu", torch.int64)
    total, start, end = y[:, 0:1], y[:, 1:2], y[:, 1:2] + y[:, 2:3]
    total_f, start_f, end_f = total.to(_F32), start.to(_F32), end.to(_F32)
    (t_lo, t_hi), (a_lo, a_hi), (r_lo, r_hi) = timing_ranges(sr, min_duration, max_duration)

    _check("total_length", total_f, t_lo, t_hi, False, total, " samples")
    total_bins = _bins(total_f, None, 1, t_bins, t_lo, t_hi)

    _check("offset (window start)", start_f, a_lo, a_hi, False, start, " samples")
    _check("offset + sample_length (window end)", end_f, a_lo, a_hi, True, end, " samples")
    absolute_bins = _bins(start_f, end_f, n_time, t_bins, a_lo, a_hi)

    rel_start = start_f / total_f
    rel_end = (end_f / total_f).clamp(r_lo, r_hi)  # the window may run past the song's end
    _check("offset / total_length", rel_start, r_lo, r_hi, False)
    relative_bins = _bins(rel_start, rel_end, n_time, t_bins, r_lo, r_hi)

    return total_bins.to(device), absolute_bins.to(device), relative_bins.to(device)
