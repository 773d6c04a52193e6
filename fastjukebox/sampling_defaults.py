"""A model family's recommended sampling settings: ``sampling.json`` beside its components.

A family may ship the temperature, top-k and top-p its priors sample best with (the role of a
``generation_config.json``). Each knob is one value for every level or a mapping from level to
value; levels it leaves out keep the built-in default::

    {"temperature": {"2": 0.8}}

``Jukebox.sample``, ``upsample``, ``continue_`` and the CLI use these for the knobs the caller
does not set, and for the levels a per-level value leaves out (``fastjukebox.settings``
resolves them); a value the caller passes always wins. A family without the file samples with
the built-in defaults (temperature 0.99, top-k and top-p off), as the original does.
"""
from __future__ import annotations

import json
from pathlib import Path

from .atomic import atomic_path
from .checkpoint import CheckpointError
from .settings import KNOB_RULES, knob_error

__all__ = ["SAMPLING_FILE", "BUILTIN", "SamplingDefaults"]

SAMPLING_FILE = "sampling.json"
BUILTIN = {knob: KNOB_RULES[knob][2] for knob in ("temperature", "top_k", "top_p")}   # DEFAULT_TEMPERATURE, off, off

class SamplingDefaults:
    """Per knob and level, the value a family samples with unless the caller sets it."""

    def __init__(self, levels: int, overrides: dict | None = None, source: str = "sampling settings"):
        self.levels = int(levels)
        self.overrides: dict[str, dict[int, float | int]] = {}
        for knob, value in (overrides or {}).items():
            if knob not in BUILTIN:
                raise CheckpointError(f"{source}: unknown field {knob!r} (known: {', '.join(BUILTIN)})")
            per_level = value if isinstance(value, dict) else {l: value for l in range(self.levels)}
            resolved = {}
            for key, v in per_level.items():
                try:
                    level = int(key)
                except (TypeError, ValueError):
                    raise CheckpointError(f"{source}: field {knob!r}: level {key!r} is not a level number") from None
                if not 0 <= level < self.levels:
                    raise CheckpointError(f"{source}: field {knob!r} names level {level}; the family has levels "
                                          f"0..{self.levels - 1}")
                why = knob_error(knob, v)
                if why is not None:
                    raise CheckpointError(f"{source}: field {knob!r}, level {level}: {why}")
                resolved[level] = v
            if resolved:
                self.overrides[knob] = resolved

    @classmethod
    def load(cls, directory: str | Path, levels: int) -> "SamplingDefaults":
        """The settings in ``directory/sampling.json``, or none when there is no such file."""
        path = Path(directory) / SAMPLING_FILE
        if not path.is_file():
            return cls(levels)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object of settings, got {type(data).__name__}")
        return cls(levels, data, source=str(path))

    def value(self, knob: str, level: int):
        """The family's value of ``knob`` at ``level`` (the built-in default where it sets none)."""
        return self.overrides.get(knob, {}).get(level, BUILTIN[knob])

    def per_level(self, knob: str) -> dict[int, float | int] | float | int:
        """The knob for every level: a single value where the family does not override it."""
        if knob not in self.overrides:
            return BUILTIN[knob]
        return {l: self.value(knob, l) for l in range(self.levels)}

    def to_json(self) -> dict:
        return {knob: {str(l): v for l, v in sorted(per.items())} for knob, per in self.overrides.items()}

    def save(self, directory: str | Path) -> Path | None:
        """Write ``directory/sampling.json``; with no override, remove a stale one and write none."""
        path = Path(directory) / SAMPLING_FILE
        if not self.overrides:
            path.unlink(missing_ok=True)
            return None
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path
