"""Progress suits logs: plain lines at a bounded rate when stderr is no terminal."""
import io

import pytest
import torch

from fastjukebox import load
from fastjukebox.progress import INTERVAL_ENV, LogProgress, progress_bar, track


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_progress_writes_at_most_one_line_per_interval():
    clock, out = FakeClock(), io.StringIO()
    bar = LogProgress(10_000, "level 1", "tok", stream=out, interval=5.0, clock=clock)
    for i in range(10_000):
        clock.t += 0.01            # 100 s of work in 10 000 updates
        bar.update(1)
        if i == 5000:
            bar.set_postfix_str("window 3/5")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert 15 <= len(lines) <= 100 / 5 + 1          # about one per 5 s, plus the closing line
    assert lines[0].startswith("level 1: ") and "tok/s" in lines[0] and "ETA" in lines[0]
    assert any(line.endswith("[window 3/5]") for line in lines)
    assert lines[-1] == "level 1: done, 10000 tok in 1:40 (100 tok/s)"
    # the ETA of a steady rate is right: at 50% of 100 s, 50 s remain
    mid = next(line for line in lines if "(50%)" in line)
    assert "ETA 0:50" in mid


def test_log_progress_silent_when_nothing_done_and_close_once():
    out = io.StringIO()
    bar = LogProgress(5, "x", stream=out, interval=0.0)
    bar.close()
    bar.close()
    assert out.getvalue() == ""
    with LogProgress(3, "y", "piece", stream=out, interval=1e9) as bar:
        bar.update(3)
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("y: done, 3 piece")


def test_progress_bar_kind_follows_the_stream():
    from tqdm import tqdm
    assert isinstance(progress_bar(10, "a", stream=io.StringIO()), LogProgress)
    tty_bar = progress_bar(10, "a", stream=Terminal())
    assert isinstance(tty_bar, tqdm)
    tty_bar.close()
    off = progress_bar(10, "a", enabled=False, stream=Terminal())
    off.update(3)
    off.total -= 2            # callers may shrink a total (the demo corpus does for skipped pieces)
    off.refresh()
    off.close()
    assert not isinstance(off, (tqdm, LogProgress)) and (off.n, off.total) == (3, 8)


def test_track_counts_items(monkeypatch, capsys):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    assert list(track(range(4), "items", "piece")) == [0, 1, 2, 3]
    err = capsys.readouterr().err
    assert "items: 1/4 piece (25%)" in err and "items: done, 4 piece" in err


def test_bad_interval_is_named(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match=INTERVAL_ENV):
        LogProgress(1, "x")


def test_sampling_progress_in_a_log_is_bounded(monkeypatch, capsys):
    """A sampling run through two levels, stderr captured (no terminal)."""
    monkeypatch.setenv(INTERVAL_ENV, "0.5")
    jb = load("demo")
    jb.sample(seconds=0.75, n_samples=1, seed=0, levels=(2, 1), progress=True)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err
    for level in (2, 1):
        assert sum(line.startswith(f"level {level}: done") for line in lines) == 1
    assert all(line.startswith("level ") for line in lines)
    assert len(lines) <= 3 + 2 * 60        # at most one line per 0.5 s per level for a run of < 1 min
    jb.sample(seconds=0.4, n_samples=1, seed=0, levels=(2,), progress=False)
    assert capsys.readouterr().err == ""
