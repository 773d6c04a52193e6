"""What ``distill`` adds to fastjukebox, registered through the ``fastjukebox.plugins`` entry point
(``pyproject.toml``): the ``"parallel"`` and ``"speculative"`` window samplers, which need a
student beside the level's prior, and the loader of those students (``student_level_{L}/``)."""
from __future__ import annotations

from fastjukebox.bundle import register_student_loader
from fastjukebox.samplers import register_sampler

__all__ = ["register"]


def _parallel(jb, level: int, passes: int | None = None, **_):
    """The level's student; ``passes`` None: the student's own (its ``sampling.json``)."""
    from .sampler import ParallelWindowSampler
    return ParallelWindowSampler(jb.student(level), passes=passes, level=level)


def _speculative(jb, level: int, gamma: int = 8, **_):
    """The level's prior, drafted by its student, ``gamma`` positions verified per prior call."""
    from .speculative import SpeculativeWindowSampler
    return SpeculativeWindowSampler(jb.prior(level), jb.student(level), gamma=gamma)


def _load_student(path, device=None, dtype=None):
    from .student import ParallelStudent
    return ParallelStudent.load(path, device=device, dtype=dtype)


def register() -> None:
    register_sampler("parallel", _parallel, needs_student=True)
    register_sampler("speculative", _speculative, needs_student=True)
    register_student_loader(_load_student)
