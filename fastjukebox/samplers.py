"""Window samplers: the interface a level's sampler implements and the registry of samplers by name.

A window sampler fills one window of a level (``WindowSampler``); ``sample_levels`` calls one per
window. The registry maps a sampler's name to a factory ``factory(jb, level, **options)`` that
builds the level's window sampler, or to None for exact autoregressive sampling
(``fastjukebox.sampling.ARWindowSampler``). Built in: ``"ar"`` and ``"ar-graph"`` (the same tokens
through the device-position step of ``fastjukebox.fast_decode``: CUDA graphs on CUDA).
Extensions add theirs through ``register_sampler`` (``fastjukebox.plugins``: the project's
``distill`` adds ``"parallel"`` and ``"speculative"``, which use the student stored beside the
level's prior).

A sampler declares the options it takes, each with its default and its check
(``register_sampler("mine", factory, options={"width": SamplerOption(4, check_count)})``). A call
passes them through as ``sampler_options`` (``--sampler-opt NAME=VALUE`` on the command line):
each is checked by the rule of the sampler that declares it, one that no sampler of the call
takes is a ``SettingsError``, and the factory of a level's sampler gets the options it declares,
the given value or the default. fastjukebox itself knows no option by name.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from .settings import SETTING_NAMES, SettingsError, check_level_keys

__all__ = ["WindowSampler", "SamplerOption", "SAMPLERS", "STUDENT_SAMPLERS", "DRAFTER_SAMPLERS", "register_sampler", "options_of",
           "describe_options", "choose_samplers", "check_sampler_options", "build_window_samplers",
           "options_record"]


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


@dataclass(frozen=True)
class SamplerOption:
    """An option a sampler takes. ``default``: its value when the call gives none; ``check(value,
    name)``: the value as used, or a ``SettingsError`` naming the option (None: any value);
    ``read_back(window_sampler)``: for an option the sampler settles itself (a None default that
    means "the model's own"), the value it settled on, recorded per level in the run's settings;
    ``help``: what it does, for the command line's help."""

    default: Any = None
    check: Callable[[Any, str], Any] | None = None
    read_back: Callable[[WindowSampler], Any] | None = None
    help: str = ""


#: name -> factory(jb, level, **options) building the level's ``WindowSampler``, or None for
#: exact autoregressive sampling
SAMPLERS = {"ar": None, "ar-graph": _graph_sampler}
STUDENT_SAMPLERS: set[str] = set()   # need a student: upsampler levels only
DRAFTER_SAMPLERS: set[str] = set()   # of those, the ones a level's drafter serves in place of its student
SAMPLER_OPTIONS: dict[str, dict[str, SamplerOption]] = {}   # name -> the options it declares


def register_sampler(name: str, factory, *, needs_student: bool = False, drafts: bool = False,
                     options: Mapping[str, SamplerOption | Any] | None = None) -> None:
    """Make ``name`` usable as a per-level sampler: ``factory(jb, level, batch=..., **options)``
    builds the level's window sampler from the run's batch size (``build_window_samplers``) and the
    values of the ``options`` it declares (option name ->
    ``SamplerOption``, or a plain default). ``needs_student``: it uses the level's student
    (``Jukebox.student``), so it serves the upsampler levels only; ``drafts``: a level's drafter
    (``Jukebox.drafter``), where there is one, does instead."""
    if not isinstance(name, str) or not name or not callable(factory):
        raise ValueError(f"a sampler needs a name and a factory, got {name!r}, {factory!r}")
    declared = {}
    for opt, spec in dict(options or {}).items():
        if not isinstance(opt, str) or not opt.isidentifier():
            raise ValueError(f"sampler {name!r}: an option name must be an identifier, got {opt!r}")
        if opt in SETTING_NAMES:
            raise ValueError(f"sampler {name!r}: option {opt!r} is the name of a sampling setting")
        if opt == "batch":
            raise ValueError(f"sampler {name!r}: option 'batch' is taken (the run's batch size every factory gets)")
        spec = spec if isinstance(spec, SamplerOption) else SamplerOption(spec)
        if spec.check is not None:
            try:
                spec.check(spec.default, opt)
            except SettingsError as e:
                raise ValueError(f"sampler {name!r}: the default of option {opt!r} fails its check ({e})") from None
        declared[opt] = spec
    SAMPLERS[name] = factory
    SAMPLER_OPTIONS[name] = declared
    (STUDENT_SAMPLERS.add if needs_student else STUDENT_SAMPLERS.discard)(name)
    (DRAFTER_SAMPLERS.add if drafts else DRAFTER_SAMPLERS.discard)(name)


def options_of(name: str) -> dict[str, SamplerOption]:
    """The options the registered sampler ``name`` declares (none for an unknown name)."""
    return SAMPLER_OPTIONS.get(name, {}) if name in SAMPLERS else {}


def _takers() -> dict[str, list[str]]:
    """Option -> the registered samplers that take it, in registration order."""
    out: dict[str, list[str]] = {}
    for name in SAMPLERS:
        for opt in options_of(name):
            out.setdefault(opt, []).append(name)
    return out


def describe_options() -> str:
    """Every registered sampler's options in words, for help and errors ("none" when none)."""
    parts = []
    for name in SAMPLERS:
        for opt, spec in options_of(name).items():
            what = spec.help or f"default: {spec.default!r}"
            parts.append(f"{opt} ({name}: {what})")
    return "; ".join(parts) or "none"


def choose_samplers(jb, sampler, levels: tuple[int, ...]) -> dict[int, str]:
    """``sampler`` (one name for every level, or {level: name} naming sampled levels only) as
    {level: name} for the sampled ``levels``: every name registered, a student sampler on the
    upsampler levels only (one name for every level means "ar" on the top level) and only where
    the family has the level's student."""
    top = jb.vqvae.config.levels - 1
    if isinstance(sampler, Mapping):
        check_level_keys("sampler", sampler, levels)
        names = {l: sampler.get(l, "ar") for l in levels}
    elif sampler is None or isinstance(sampler, str):
        names = {l: sampler or "ar" for l in levels}
    else:
        raise SettingsError(f"sampler must be a name or {{level: name}}, got {sampler!r}")
    for l, name in names.items():
        if not isinstance(name, str) or name not in SAMPLERS:
            raise SettingsError(f"unknown sampler {name!r} for level {l}; available: {', '.join(sorted(SAMPLERS))}")
        if name in STUDENT_SAMPLERS and l == top:
            if isinstance(sampler, Mapping):
                raise SettingsError(f"the {name} sampler covers the upsamplers (levels {top - 1}..0); the top "
                                    f"level {top} is sampled autoregressively ('ar')")
            names[l] = "ar"   # one name for every level: the student's sampler where there is a student
        if names[l] in STUDENT_SAMPLERS and not (names[l] in DRAFTER_SAMPLERS and jb.drafter(l) is not None):
            jb.student(l)     # named error when the family has no student (nor drafter) for the level
    return names


def check_sampler_options(names: Mapping[int, str], given: Mapping[str, Any]) -> dict[str, Any]:
    """The ``given`` sampler options as used by the samplers ``names`` ({level: name}): each
    checked by the rule of the samplers that declare it. An option no registered sampler declares,
    or none of ``names``, is a ``SettingsError``."""
    takers, chosen = _takers(), set(names.values())
    out = {}
    for opt, value in given.items():
        if opt not in takers:
            raise SettingsError(f"unknown sampler option {opt!r}; the samplers take: {describe_options()}")
        using = [n for n in takers[opt] if n in chosen]
        for name in using or takers[opt][:1]:          # a bad value is named before a misplaced one
            check = options_of(name)[opt].check
            value = value if check is None else check(value, opt)
        if not using:
            used = ", ".join(f"{l}={n}" for l, n in names.items())
            raise SettingsError(f"sampler option {opt!r} is taken by the {' and '.join(takers[opt])} sampler(s), "
                                f"which this call does not use (it samples {used})")
        out[opt] = value
    return out


def _values(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    return {opt: options.get(opt, spec.default) for opt, spec in options_of(name).items()}


def build_window_samplers(jb, names: Mapping[int, str], options: Mapping[str, Any],
                          batch: int | None = None) -> dict[int, WindowSampler]:
    """Level -> window sampler for the levels not sampled autoregressively; each factory gets the
    options its sampler declares (``options``: ``check_sampler_options``'s, the rest defaulted) and
    ``batch``: the rows the run decodes together (the same in every process of a launch; None:
    unknown), for a sampler whose best strategy depends on it."""
    return {level: SAMPLERS[name](jb, level, batch=batch, **_values(name, options))
            for level, name in names.items() if SAMPLERS[name] is not None}


def options_record(names: Mapping[int, str], options: Mapping[str, Any],
                   built: Mapping[int, WindowSampler]) -> dict[str, Any]:
    """The sampler options as used, for a run's settings: every option of a registered sampler,
    None where no sampled level's sampler takes it; one that its sampler settles itself
    (``read_back``) as {level: value}, any other as one value (per level where levels differ)."""
    out = {}
    for opt in _takers():
        per_level, read = {}, False
        for level, name in names.items():
            spec = options_of(name).get(opt)
            if spec is None:
                continue
            if spec.read_back is not None and level in built:
                per_level[level], read = spec.read_back(built[level]), True
            else:
                per_level[level] = options.get(opt, spec.default)
        values = list(per_level.values())
        out[opt] = None if not values else per_level if read or any(v != values[0] for v in values) else values[0]
    return out
