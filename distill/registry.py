"""What ``distill`` adds to fastjukebox, registered through the ``fastjukebox.plugins`` entry point
(``pyproject.toml``): the ``"parallel"`` and ``"speculative"`` window samplers, which need a
student (or, for ``"speculative"``, a drafter) beside the level's prior, with their options
(``passes``, ``gamma``: their defaults and checks), and the loaders of those students
(``student_level_{L}/``) and drafters (``drafter_level_{L}/``)."""
from __future__ import annotations

from functools import partial

from fastjukebox.bundle import register_component_loader
from fastjukebox.samplers import SamplerOption, register_sampler
from fastjukebox.settings import check_count

from .sampler import ParallelWindowSampler
from .speculative import DISABLE_AT_BATCH, GAMMA, SpeculativeWindowSampler

__all__ = ["register"]

PASSES_OPTION = SamplerOption(None, partial(check_count, allow_none=True), read_back=lambda sampler: sampler.passes,
                              help="decoding passes per window; default: the student's own, from its sampling.json")
GAMMA_OPTION = SamplerOption(GAMMA, check_count, help=f"positions the prior verifies per call; default: {GAMMA}")
DISABLE_OPTION = SamplerOption(None, partial(check_count, allow_none=True),
                               read_back=lambda sampler: sampler.disable_at_batch,
                               help="batch size from which a window is decoded token by token, without drafts; "
                                    f"default: the device's measured crossover ({DISABLE_AT_BATCH}; others: never)")


def _parallel(jb, level: int, passes: int | None = None, **_):
    """The level's student; ``passes`` None: the student's own (its ``sampling.json``)."""
    return ParallelWindowSampler(jb.student(level), passes=passes, level=level)


def _speculative(jb, level: int, gamma: int = GAMMA, disable_at_batch: int | None = None, batch: int | None = None,
                 **_):
    """The level's prior, drafted by its drafter (or, without one, its student), ``gamma``
    positions verified per prior call; token by token where the run's ``batch`` (else each
    window's rows) reaches ``disable_at_batch`` (None: the prior's device type's
    ``DISABLE_AT_BATCH``)."""
    prior, drafter = jb.prior(level), jb.drafter(level)
    if disable_at_batch is None:
        disable_at_batch = DISABLE_AT_BATCH.get(prior.device.type)
    kw = dict(gamma=gamma, disable_at_batch=disable_at_batch, run_batch=batch)
    if drafter is not None:
        return SpeculativeWindowSampler(prior, drafter=drafter, **kw)
    return SpeculativeWindowSampler(prior, jb.student(level), **kw)


def _load_student(path, device=None, dtype=None):
    from .student import ParallelStudent
    return ParallelStudent.load(path, device=device, dtype=dtype)


def _load_drafter(path, device=None, dtype=None):
    from .drafter import FeatureDrafter
    return FeatureDrafter.load(path, device=device, dtype=dtype)


def register() -> None:
    register_sampler("parallel", _parallel, needs_student=True, options={"passes": PASSES_OPTION})
    register_sampler("speculative", _speculative, needs_student=True, drafts=True,
                     options={"gamma": GAMMA_OPTION, "disable_at_batch": DISABLE_OPTION})
    register_component_loader("student", _load_student)
    register_component_loader("drafter", _load_drafter)
