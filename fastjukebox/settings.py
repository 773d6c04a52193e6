"""Sampling settings, checked once for the API and the command line, before any model work.

Every value a sampling call takes is checked here and resolved to what the run will use:

* the per-level knobs ``temperature`` (a finite number >= 0; 0 is greedy: the argmax after
  top-k / top-p, for every sampler), ``top_k`` (an integer >= 0), ``top_p`` (in [0, 1]),
  ``chunk_size`` (an integer >= 1) and ``hop_fraction`` (in (0, 1]): one value for every level,
  a sequence indexed by level, or a mapping ``{level: value}`` that may name only the levels the
  call samples;
* ``sampler``: one name for every level or ``{level: name}`` (again only sampled levels), and
  ``sampler_options``: ``{option: value}`` for the chosen samplers, each checked by the sampler
  that declares it (``fastjukebox.samplers``; ``passes=`` and ``gamma=`` are short for the
  options of those names, ``SAMPLER_OPTION_ALIASES``);
* ``seconds`` (finite, > 0, at most ``MAX_SECONDS``), ``n_samples`` and ``max_batch_size``
  (integers >= 1), ``seed`` (an integer or None), integer-typed codes;
* the device string and dtype of a load (an unknown device is an error; float16 / bfloat16 on a
  CPU warn once with their cost).

A bad value is a ``SettingsError`` (a ``ValueError``) naming the setting, the value and what it
must be. ``resolve_sampling`` returns the settings as used, one value per sampled level, which
``SampleResult.settings`` carries and the command line records in its ``.npz``
(``Jukebox.resolve_sampling`` is the entry point: it knows the registered samplers).
"""
from __future__ import annotations

import math
import numbers
import secrets
import warnings
from collections.abc import Mapping

import torch

__all__ = ["SettingsError", "MAX_SECONDS", "DEFAULT_TEMPERATURE", "DEFAULT_CHUNK_SIZE", "KNOB_RULES", "SETTING_NAMES", "SAMPLER_OPTION_ALIASES", "knob_error",
           "check_knob", "check_seconds", "check_count", "check_device", "check_codes", "check_level_keys",
           "warn_half_on_cpu", "resolve_sampling"]

#: Longest audio one call samples or continues to. Longer requests are refused before the label
#: and window tables (which grow with the length) are made.
MAX_SECONDS = 3600.0

#: The sampling temperature where nothing sets one: the original's upsampler default.
DEFAULT_TEMPERATURE = 0.99
#: Known tokens primed per step (one forward over a chunk) where nothing sets it.
DEFAULT_CHUNK_SIZE = 32

#: float16 / bfloat16 against float32 on a CPU, one thread of a 2-core CPU, the demo family:
#: upsampling 0.75 s 3x (bf16) and 4x (fp16) slower; the main command (10 s, decoding included) 11x.
HALF_ON_CPU_SLOWDOWN = "3 to 11 times"


class SettingsError(ValueError):
    """A sampling setting that cannot be used: names the setting, the value and the rule."""


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


#: knob -> (test of one value, what it must be, the default when nothing sets it)
KNOB_RULES = {
    "temperature": (lambda v: _is_real(v) and math.isfinite(v) and v >= 0,
                    "a finite number >= 0 (0: greedy)", DEFAULT_TEMPERATURE),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: off)", 0),
    "top_p": (lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1] (0: off)", 0.0),
    "chunk_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1", DEFAULT_CHUNK_SIZE),
    "hop_fraction": (lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1]", (0.5, 0.5, 0.125)),
}
PER_LEVEL = tuple(KNOB_RULES) + ("sampler",)
_OTHER = ("max_batch_size", "run_samples", "seed", "progress", "sample_seeds", "sampler_options")
#: sampling keywords kept from before ``sampler_options``: each is short for the sampler option of
#: its name (``passes=2`` is ``sampler_options={"passes": 2}``), which the sampler declaring it
#: checks and defaults (``fastjukebox.samplers``)
SAMPLER_OPTION_ALIASES = ("passes", "gamma")
#: the names of the sampling settings (a sampler option may not take one)
SETTING_NAMES = PER_LEVEL + _OTHER


def knob_error(name: str, value) -> str | None:
    """Why ``value`` cannot be the value of ``name`` at one level (None: it can)."""
    ok, what, _ = KNOB_RULES[name]
    return None if ok(value) else f"{name} must be {what}, got {value!r}"


def check_knob(name: str, value, level: int | None = None):
    """``value`` for one level of knob ``name``, or a ``SettingsError``."""
    why = knob_error(name, value)
    if why is not None:
        raise SettingsError(why if level is None else f"{why} (level {level})")
    return value


def check_count(value, name: str, allow_none: bool = False):
    """An integer >= 1 (``n_samples``, ``max_batch_size``, a sampler's count options)."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        raise SettingsError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_seconds(seconds, name: str = "seconds") -> float:
    """A finite number of seconds in (0, ``MAX_SECONDS``]."""
    if not _is_real(seconds) or not math.isfinite(seconds) or seconds <= 0:
        raise SettingsError(f"{name} must be a finite number > 0, got {seconds!r}")
    if seconds > MAX_SECONDS:
        raise SettingsError(f"{name} must be at most {MAX_SECONDS:g} (one hour), got {seconds!r}")
    return float(seconds)


def check_codes(codes, what: str) -> torch.Tensor:
    """``codes`` as a tensor of an integer dtype with at least one code per sample (bool, float
    and complex are refused: they are not code ids)."""
    z = torch.as_tensor(codes)
    if z.is_floating_point() or z.is_complex() or z.dtype == torch.bool:
        raise SettingsError(f"{what} must be integer codes, got {z.dtype}")
    if z.dim() == 0 or z.shape[-1] == 0 or z.numel() == 0:
        raise SettingsError(f"{what} are empty (shape {tuple(z.shape)}); give at least one code per sample")
    return z


def check_device(device) -> torch.device:
    """A device torch knows and this machine has."""
    if isinstance(device, torch.device):
        dev = device
    else:
        if not isinstance(device, str) or not device.strip():
            raise SettingsError(f"device must be a device name such as 'cpu' or 'cuda:0', got {device!r}")
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise SettingsError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(f"device {str(device)!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SettingsError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} "
                                f"CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SettingsError(f"device {str(device)!r}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise SettingsError(f"device {str(device)!r} is not supported; use cpu, cuda or cuda:N")
    return dev


_warned_half = False


def warn_half_on_cpu(dtype: torch.dtype | None, device) -> None:
    """Warn (once per process) that float16 / bfloat16 run far slower than float32 on a CPU."""
    global _warned_half
    if _warned_half or dtype not in (torch.float16, torch.bfloat16) or torch.device(device).type != "cpu":
        return
    _warned_half = True
    name = str(dtype).replace("torch.", "")
    warnings.warn(f"{name} on a CPU runs {HALF_ON_CPU_SLOWDOWN} slower than float32 (measured on the demo "
                  f"family; the CPU has no fast {name} kernels); use float32 on a CPU", UserWarning, stacklevel=3)


def _levels_text(levels) -> str:
    return ", ".join(map(str, sorted(levels, reverse=True))) or "none"


def check_level_keys(name: str, value: Mapping, levels: tuple[int, ...]) -> None:
    """A per-level mapping ``value`` of setting ``name`` names sampled ``levels`` only."""
    bad = [k for k in value if not _is_int(k) or k not in levels]
    if bad:
        raise SettingsError(f"{name} names level(s) {', '.join(map(repr, bad))}, which this call does not "
                            f"sample; it samples level(s) {_levels_text(levels)}")


def _per_level_values(name: str, value, levels: tuple[int, ...], n_levels: int, fallback,
                      given: bool = True) -> dict[int, object]:
    """{level: value} for the sampled ``levels``, every value checked; a mapping ``given`` by the
    caller may name sampled levels only, the levels it leaves out take ``fallback``."""
    if isinstance(value, Mapping):
        if given:
            check_level_keys(name, value, levels)
        out = {}
        for l in levels:
            if l in value:
                out[l] = value[l]
            else:
                out[l] = fallback[l] if isinstance(fallback, (Mapping, list, tuple)) else fallback
    elif isinstance(value, (list, tuple)):
        if len(value) != n_levels:
            raise SettingsError(f"{name} as a sequence needs one value per level (level 0 first, "
                                f"{n_levels} values), got {len(value)}")
        out = {l: value[l] for l in levels}
    else:
        out = {l: value for l in levels}
    for l, v in out.items():
        check_knob(name, v, l)
    return out


def _given_sampler_options(sampling: dict) -> dict:
    """``sampler_options`` with the aliases (``SAMPLER_OPTION_ALIASES``) folded in; an option
    given both ways with two values is a ``SettingsError``."""
    given = sampling.get("sampler_options")
    if given is None:
        given = {}
    if not isinstance(given, Mapping) or not all(isinstance(k, str) for k in given):
        raise SettingsError(f"sampler_options must be a mapping from option name to value, got {given!r}")
    out = dict(given)
    for alias in SAMPLER_OPTION_ALIASES:
        value = sampling.get(alias)
        if value is None:
            continue
        if alias in out and out[alias] != value:
            raise SettingsError(f"{alias} is given twice: {alias}={value!r} and sampler_options[{alias!r}]="
                                f"{out[alias]!r}")
        out[alias] = value
    return out


def resolve_sampling(jb, levels, sampling: dict, choose_samplers, check_sampler_options) -> dict:
    """The sampling keyword arguments of a ``Jukebox`` call, checked and resolved for the sampled
    ``levels``: per-level knobs as ``{level: value}`` (the caller's, else the family's
    ``sampling.json``, else the built-in default), ``sampler`` as ``{level: name}``
    (``choose_samplers(jb, sampler, levels)``), ``sampler_options`` as given, aliases included,
    and checked (``check_sampler_options(names, options)``), and the other options as given or
    defaulted. Raises ``SettingsError`` naming the first bad setting. ``Jukebox.resolve_sampling``
    calls it with the sampler registry's functions (``fastjukebox.samplers``)."""
    unknown = sorted(set(sampling) - set(SETTING_NAMES) - set(SAMPLER_OPTION_ALIASES))
    if unknown:
        raise SettingsError(f"unknown sampling setting(s) {', '.join(unknown)}; known: "
                            f"{', '.join(SETTING_NAMES + SAMPLER_OPTION_ALIASES)}")
    n_levels = jb.vqvae.config.levels
    levels = tuple(levels)
    if not levels:
        raise SettingsError("no levels to sample")
    for l in levels:
        if not _is_int(l) or l not in jb.levels:
            raise SettingsError(f"levels: this model has priors for level(s) {_levels_text(jb.levels)}, "
                                f"not {l!r}")
    if len(set(levels)) != len(levels):
        raise SettingsError(f"levels must be distinct, got {levels}")
    defaults = jb.sampling_defaults
    out: dict = {}
    for name in KNOB_RULES:
        value = sampling.get(name)
        fallback = defaults.per_level(name) if name in ("temperature", "top_k", "top_p") else KNOB_RULES[name][2]
        out[name] = _per_level_values(name, fallback if value is None else value, levels, n_levels, fallback,
                                      given=value is not None)
    out["sampler"] = choose_samplers(jb, sampling.get("sampler"), levels)
    out["sampler_options"] = check_sampler_options(out["sampler"], _given_sampler_options(sampling))
    out["max_batch_size"] = check_count(sampling.get("max_batch_size", 16), "max_batch_size")
    out["run_samples"] = check_count(sampling.get("run_samples"), "run_samples", allow_none=True)
    seed = sampling.get("seed")
    if seed is not None and not _is_int(seed):
        raise SettingsError(f"seed must be an integer or None, got {seed!r}")
    out["seed"] = secrets.randbelow(2**31) if seed is None else int(seed)   # recorded: the run repeats
    seeds = sampling.get("sample_seeds")
    if seeds is not None:
        seeds = list(seeds) if isinstance(seeds, (list, tuple, range)) else None
        if seeds is None or not all(_is_int(v) and v >= 0 for v in seeds):
            raise SettingsError(f"sample_seeds must be a list of integers >= 0 (one per sample), got "
                                f"{sampling.get('sample_seeds')!r}")
    out["sample_seeds"] = seeds
    out["progress"] = bool(sampling.get("progress", True))
    return out
