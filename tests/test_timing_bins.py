import json
import os
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from fastjukebox.labels import Labels, window_labels
from fastjukebox.timing_bins import time_bins, timing_ranges

DATA = Path(__file__).parent / "data"
TINY = dict(n_time=64, t_bins=32, sr=44100, min_duration=0.0625, max_duration=2.0)


@lru_cache(maxsize=None)
def windows() -> dict:
    return json.loads((DATA / "windows.json").read_text(encoding="utf-8"))


def rle(values: list[int]) -> list[list[int]]:
    """Runs [value, first_position, count]."""
    runs: list[list[int]] = []
    for i, v in enumerate(values):
        if runs and runs[-1][0] == v:
            runs[-1][2] += 1
        else:
            runs.append([v, i, 1])
    return runs


def test_tiny_pipeline_window_bins():
    fx = windows()["tiny_pipeline"]["levels"]["level2"]
    labels = Labels.from_y(fx["labels_y"])
    for w in fx["windows"]:
        y = window_labels(labels, w["start"], fx["raw_to_tokens"], fx["prior_sample_length"])
        total, absolute, relative = time_bins(y, **TINY)
        assert total.shape == (2, 1) and absolute.shape == relative.shape == (2, 64)
        assert total.dtype == absolute.dtype == relative.dtype == torch.int64
        assert total[:, 0].tolist() == w["time_bins_total"]
        assert absolute.tolist() == w["time_bins_absolute"]
        assert relative.tolist() == w["time_bins_relative"]


@pytest.mark.parametrize("model", ["tiny_prior_5b", "tiny_prior_1b_lyrics", "tiny_prior_5b_lyrics"])
def test_io_fixture_bins(model):
    with np.load(DATA / f"{model}_io.npz") as z:
        y = torch.from_numpy(z["y"])
        total, absolute, relative = time_bins(y, **TINY)  # extra label columns are ignored
        np.testing.assert_array_equal(total.numpy(), z["time_bins_total"])
        np.testing.assert_array_equal(absolute.numpy(), z["time_bins_absolute"])
        np.testing.assert_array_equal(relative.numpy(), z["time_bins_relative"])


@pytest.mark.parametrize("name", ["prior_5b", "prior_5b_lyrics", "prior_1b_lyrics"])
def test_real_size_rows(name):
    fx = windows()["time_bins_real_size"][name]
    kw = {k: fx[k] for k in ("n_time", "t_bins", "sr", "min_duration", "max_duration")}
    n_errors = 0
    for row in fx["rows"]:
        y = torch.tensor([[row["total_length"], row["offset"], row["length"]]])
        if "error" in row:
            n_errors += 1
            with pytest.raises(ValueError, match=rf"total_length = {row['total_length']}"):
                time_bins(y, **kw)
            continue
        total, absolute, relative = time_bins(y, **kw)
        assert total.item() == row["total_bin"]
        assert rle(absolute[0].tolist()) == row["absolute_bins_rle"], row
        assert rle(relative[0].tolist()) == row["relative_bins_rle"], row
    assert n_errors == 1


def test_float32_rounding_of_total_length():
    kw = dict(TINY, min_duration=60.0, max_duration=600.0, n_time=8)
    ok = torch.tensor([[26459998, 0, 1024]])
    assert time_bins(ok, **kw)[0].item() == 31
    # One sample short of the maximum, but it rounds up to the maximum in float32.
    with pytest.raises(ValueError, match=r"26460000\.0 in float32.*\[2646000\.0, 26460000\.0\)"):
        time_bins(torch.tensor([[26459999, 0, 1024]]), **kw)


def test_range_errors_name_the_quantity():
    hi = int(2.0 * 44100)
    cases = [
        ([100, 0, 8192], "total_length = 100 samples"),
        ([hi, 0, 8192], "total_length"),
        ([40960, -1, 8192], r"offset \(window start\) = -1"),
        ([hi - 1, hi - 100, 8192], r"offset \+ sample_length \(window end\) = 96292"),
        ([40960, 40960, 8192], "offset / total_length = 1.0"),
    ]
    for row, message in cases:
        with pytest.raises(ValueError, match=message):
            time_bins(torch.tensor([[40960, 0, 8192], row]), **TINY)
    with pytest.raises(ValueError, match="integers"):
        time_bins(torch.zeros(1, 3), **TINY)


def test_window_end_past_song_end_is_clamped():
    total, absolute, relative = time_bins(torch.tensor([[40960, 36864, 8192]]), **TINY)
    assert relative[0, -1].item() == 31 and relative.max().item() == 31
    assert absolute[0, 0].item() == int(32 * 36864 / (2.0 * 44100))
    assert timing_ranges(44100, 0.0625, 2.0) == ((2756.25, 88200.0), (0.0, 88200.0), (0.0, 1.0))


def test_device_and_input_untouched():
    y = torch.tensor([[40960, 0, 8192, 3, 1]], dtype=torch.int32)
    before = y.clone()
    total, absolute, _ = time_bins(y, **TINY)
    assert total.device == y.device and absolute.dtype == torch.int64
    assert torch.equal(y, before)
