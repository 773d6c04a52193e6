"""A chorale's notes written as text on a fixed time grid, aligned with its rendered audio.

The quality report compares audio with the notes of its score through this text
(``evaluate.score_agreement``): which pitches sound in every stretch of ``GRID_SECONDS``.

Format: one cell of four characters per ``GRID_SECONDS`` of audio, the pitch sounding at the cell's
centre in soprano, alto, tenor and bass order. A pitch is one character of ``PITCH_CHARS``
(MIDI ``LOWEST_PITCH`` upwards, clamped at both ends), a silent voice is ``REST``. The text of a
piece with ``n`` audio samples has exactly ``cells_for(n)`` cells, so a character index and an
audio position correspond one to one (``CHARS_PER_SECOND`` characters per second of audio). All
characters are in the lyric vocabularies (:mod:`fastjukebox.text`), so the text can also be given
to a prior as lyrics.
"""
from __future__ import annotations

import numpy as np

from .scores import VOICES, ScoreEvents
from .synth import SR

__all__ = ["GRID_SECONDS", "CHARS_PER_SECOND", "PITCH_CHARS", "LOWEST_PITCH", "REST",
           "cells_for", "score_text", "crop_text", "pitches_of_text"]

GRID_SECONDS = 0.125
PITCH_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
LOWEST_PITCH = 28  # E1: PITCH_CHARS spans MIDI 28..89
REST = "."
CHARS_PER_SECOND = len(VOICES) / GRID_SECONDS


def cells_for(n_samples: int, sr: int = SR) -> int:
    """Grid cells of a piece ``n_samples`` long (at least one)."""
    if n_samples <= 0:
        raise ValueError(f"n_samples must be > 0, got {n_samples}")
    return max(1, int(round(n_samples / (GRID_SECONDS * sr))))


def score_text(events: ScoreEvents, n_samples: int, sr: int = SR) -> str:
    """The text of ``events`` rendered to ``n_samples`` of audio (the render's length, reverb tail
    included: the tail's cells are rests)."""
    n_cells = cells_for(n_samples, sr)
    grid = np.full((n_cells, len(VOICES)), -1, dtype=np.int64)
    centres = (np.arange(n_cells) + 0.5) * (n_samples / sr / n_cells)
    # later events overwrite earlier ones; sort by pitch so the highest of a voice's chord wins
    for i in np.argsort(events.pitch, kind="stable"):
        on, off = events.onset[i], events.onset[i] + events.duration[i]
        lo, hi = np.searchsorted(centres, on, "left"), np.searchsorted(centres, off, "left")
        grid[lo:hi, int(events.voice[i])] = int(events.pitch[i])
    top = LOWEST_PITCH + len(PITCH_CHARS) - 1
    chars = [REST if p < 0 else PITCH_CHARS[min(max(p, LOWEST_PITCH), top) - LOWEST_PITCH]
             for p in grid.reshape(-1)]
    return "".join(chars)


def crop_text(text: str, n_samples: int, sr: int = SR) -> str:
    """The start of a score text that goes with the first ``n_samples`` of its audio."""
    return text[: cells_for(n_samples, sr) * len(VOICES)]


def pitches_of_text(text: str) -> np.ndarray:
    """Inverse of the character mapping: ``(cells, 4)`` MIDI pitches, -1 for a rest. Raises
    ``ValueError`` on a text that is not whole cells of pitch and rest characters."""
    width = len(VOICES)
    if len(text) % width:
        raise ValueError(f"a score text is whole cells of {width} characters; got {len(text)} characters")
    bad = sorted(set(text) - set(PITCH_CHARS) - {REST})
    if bad:
        raise ValueError(f"not a score text: characters {''.join(bad)!r} are neither pitches nor rests")
    codes = np.array([-1 if c == REST else LOWEST_PITCH + PITCH_CHARS.index(c) for c in text], dtype=np.int64)
    return codes.reshape(-1, width)
