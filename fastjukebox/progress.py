"""Progress of long work, readable on a terminal and in a log.

``progress_bar`` returns a tqdm bar when its stream is a terminal. Anywhere else (a log file, a
pipe, a notebook's captured stderr, CI) it returns a ``LogProgress``: one plain line at most every
``interval`` seconds (``FASTJUKEBOX_PROGRESS_INTERVAL``, default 10) and one when the work ends,
each with the count, the rate and the time left, and never a carriage return::

    level 1: 2048/8192 tok (25%), 153 tok/s, ETA 0:40 [window 2/5]
    level 1: done, 8192 tok in 0:53 (154 tok/s)

Both kinds take the same calls (``update``, ``set_postfix_str``, ``set_postfix``, ``refresh``,
``close``, a writable ``total``, and use as a context manager), so callers never ask which one
they have; ``track`` wraps an iterable.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

INTERVAL_ENV = "FASTJUKEBOX_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0


def _clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _interval() -> float:
    text = os.environ.get(INTERVAL_ENV)
    if text is None:
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}={text!r}: expected a number of seconds") from None
    if not value >= 0:
        raise ValueError(f"{INTERVAL_ENV}={text!r}: expected a number of seconds >= 0")
    return value


class LogProgress:
    """Progress as plain lines, at most one every ``interval`` seconds plus one at the end."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0,
                 stream: TextIO | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start = initial
        self.stream = stream
        self.interval = _interval() if interval is None else interval
        self._clock = clock
        self._t0 = self._last = clock()
        self._postfix = ""
        self._closed = False

    # tqdm's calls ----------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self.interval and not self._finished():
            self._last = now
            self._write(self._status(now))

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        done = self.n - self._start
        if done == 0:
            return
        elapsed = self._clock() - self._t0
        rate = f" ({done / elapsed:.3g} {self.unit}/s)" if elapsed > 0 else ""
        self._write(f"{self.desc}: done, {self.n} {self.unit} in {_clock_text(elapsed)}{rate}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------
    def _finished(self) -> bool:
        return self.total is not None and self.n >= self.total

    def _status(self, now: float) -> str:
        elapsed = now - self._t0
        done = self.n - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            line = f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            line = f"{self.desc}: {self.n} {self.unit}"
        line += f", {rate:.3g} {self.unit}/s"
        if self.total and rate > 0:
            line += f", ETA {_clock_text((self.total - self.n) / rate)}"
        return line + (f" [{self._postfix}]" if self._postfix else "")

    def _write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(line, file=stream, flush=True)


class _NoProgress:
    """Takes the calls and shows nothing; ``total`` and ``n`` stay readable and writable."""

    def __init__(self, total: int | None = None, initial: int = 0):
        self.total, self.n = total, initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def refresh(self) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int | None, desc: str, unit: str = "it", *, enabled: bool = True, initial: int = 0,
                 leave: bool = True, stream: TextIO | None = None, **tqdm_kwargs):
    """A progress display for ``total`` units of work: tqdm on a terminal, ``LogProgress``
    elsewhere, nothing when ``enabled`` is false. ``tqdm_kwargs`` (e.g. ``position``) go to tqdm."""
    if not enabled:
        return _NoProgress(total, initial)
    target = stream if stream is not None else sys.stderr
    if _is_terminal(target):
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=target,
                    dynamic_ncols=True, **tqdm_kwargs)
    return LogProgress(total, desc, unit, initial=initial, stream=stream)


def track(iterable, desc: str, unit: str = "it", *, enabled: bool = True, total: int | None = None):
    """Yield from ``iterable`` with a ``progress_bar`` counting the items."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with progress_bar(total, desc, unit, enabled=enabled) as bar:
        for item in iterable:
            yield item
            bar.update(1)
