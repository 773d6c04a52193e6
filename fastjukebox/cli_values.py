"""Values of the sampling commands' options: argparse types that parse one option's text and
check it, by the rule the API uses where it has one (``settings``), so that bad input is named
before any work.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Callable

from .settings import KNOB_RULES, SettingsError, check_seconds, knob_error


def parse_seconds(text: str) -> float:
    """A length in seconds: finite, > 0 and at most ``settings.MAX_SECONDS``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    try:
        return check_seconds(value, "the length")
    except SettingsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _int_at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
        return value
    return parse


parse_nonneg_int, parse_positive_int = _int_at_least(0), _int_at_least(1)


def per_level_parser(knob: str, convert: Callable[[str], Any]):
    """A value of ``knob`` for all levels (``0.99``) or per level (``2=0.98,1=0.99,0=0.99``), each
    checked by the rule the API uses (``settings.KNOB_RULES``)."""
    what = KNOB_RULES[knob][1]

    def parse(text: str):
        def one(s: str):
            try:
                v = convert(s.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"{s.strip()!r} is not {what}") from None
            if knob_error(knob, v) is not None:
                raise argparse.ArgumentTypeError(f"{s.strip()!r} is not {what}")
            return v

        if "=" not in text:
            return one(text)
        out = {}
        for part in text.split(","):
            level, sep, value = part.partition("=")
            if not sep or not level.strip().isdigit():
                raise argparse.ArgumentTypeError(
                    f"expected one value or LEVEL=VALUE pairs such as '2=..,1=..,0=..', got {text!r}")
            out[int(level)] = one(value)
        return out

    return parse


def parse_sampler(text: str):
    """``ar`` for all levels or ``LEVEL=NAME`` pairs (``1=ar,0=ar``)."""
    if "=" not in text:
        if not text.strip():
            raise argparse.ArgumentTypeError("empty sampler name")
        return text.strip()
    out = {}
    for part in text.split(","):
        level, sep, name = part.partition("=")
        if not sep or not level.strip().isdigit() or not name.strip():
            raise argparse.ArgumentTypeError(f"expected a sampler name or LEVEL=NAME pairs such as "
                                             f"'1=ar,0=ar', got {text!r}")
        out[int(level)] = name.strip()
    return out


def _option_value(text: str):
    """A sampler option's value from its text: an integer, a number, ``true`` / ``false``, ``none``
    or else the text itself (the sampler declaring the option checks it)."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _sampler_option(text: str) -> tuple[str, Any]:
    """``NAME=VALUE``: one option of the chosen samplers (``passes=2``)."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name.isidentifier() or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE such as 'passes=2', got {text!r}")
    return name, _option_value(value)


class SamplerOptions(argparse.Action):
    """``--sampler-opt NAME=VALUE``, repeatable: collects {name: value}; a name given twice is
    an error."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, type=_sampler_option, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        name, v = value
        options = dict(getattr(namespace, self.dest, None) or {})
        if name in options:
            raise argparse.ArgumentError(self, f"option {name!r} is given twice")
        options[name] = v
        setattr(namespace, self.dest, options)


def parse_levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected levels such as '2,1,0', got {text!r}") from None
    if not levels or any(l < 0 for l in levels) or len(set(levels)) != len(levels):
        raise argparse.ArgumentTypeError(f"expected distinct levels >= 0 such as '2,1,0', got {text!r}")
    return tuple(sorted(levels, reverse=True))


def parse_label(text: str) -> int | str:
    """A numeric id or a name (names need the id files)."""
    return int(text) if text.strip().isdigit() else text


def parse_genre(text: str) -> int | list[int] | str:
    """A numeric id, several ids ``3,7`` (a v2 bag of genre words) or a name."""
    if re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", text):
        ids = [int(p) for p in text.split(",")]
        return ids[0] if len(ids) == 1 else ids
    return text
