import json
import os
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from fastjukebox.labels import (LabelIds, Labeller, Labels, UnknownLabelError, get_starts,
                                normalise_v2_name, relevant_lyric_tokens, window_labels)

DATA = Path(__file__).parent / "data"
TINY = ["lyrics_tiny_prior_1b_lyrics", "lyrics_tiny_prior_5b_lyrics"]
REAL = ["prior_1b_lyrics", "prior_5b_lyrics"]


@lru_cache(maxsize=None)
def windows() -> dict:
    return json.loads((DATA / "windows.json").read_text(encoding="utf-8"))


def lyric_fixture(key: str) -> dict:
    """A lyric case with uniform keys: version, n_tokens, G, sample_length, raw_to_tokens, ..."""
    if key in TINY:
        fx = dict(windows()[key])
        fx["version"] = fx["text_processor"]
        fx["n_ctx"] = fx["prior_sample_length"] // fx["raw_to_tokens"]
    else:
        fx = dict(windows()["lyrics_real_size"][key])
        fx["version"] = "v3" if fx["v3"] else "v2"
        fx["raw_to_tokens"] = fx["prior_sample_length"] // fx["n_ctx"]
        fx["total_tokens"] = fx["sample_length"] // fx["raw_to_tokens"]
    fx["G"] = len(fx["labels_y"][0]) - 4 - fx["n_tokens"]
    return fx


def numeric_labels(fx: dict) -> Labels:
    lab = Labeller(fx["G"], fx["n_tokens"], fx["prior_sample_length"], fx["version"])
    G = fx["G"]
    return lab.label_batch([dict(meta, artist=y[3], genre=[g for g in y[4:4 + G] if g >= 0])
                            for meta, y in zip(fx["metas"], fx["labels_y"])])


@pytest.mark.parametrize("key", TINY + REAL)
def test_labels_and_windows_match_fixture(key):
    fx = lyric_fixture(key)
    labels = numeric_labels(fx)
    assert labels.y.dtype == torch.int64
    assert labels.y.tolist() == fx["labels_y"]
    assert labels.full_tokens == fx["full_tokens"]
    starts = get_starts(fx["total_tokens"], fx["n_ctx"], fx["hop_length"])
    assert starts == fx["starts"] == [w["start"] for w in fx["windows"]]
    before = labels.y.clone()
    for w in fx["windows"]:
        y, idx = window_labels(labels, w["start"], fx["raw_to_tokens"], fx["prior_sample_length"],
                               return_indices=True)
        assert y.tolist() == w["y"], w["start"]
        assert idx == w["indices"], w["start"]
    assert torch.equal(labels.y, before)


@pytest.mark.parametrize("level", ["level2", "level1", "level0"])
def test_tiny_pipeline_windows(level):
    fx = windows()["tiny_pipeline"]["levels"][level]
    labels = Labels.from_y(fx["labels_y"])
    assert fx["prior_sample_length"] == fx["n_ctx"] * fx["raw_to_tokens"]
    assert get_starts(fx["total_tokens"], fx["n_ctx"], fx["hop_length"]) == fx["starts"]
    for w in fx["windows"]:
        y = window_labels(labels, w["start"], fx["raw_to_tokens"], fx["prior_sample_length"])
        assert y.tolist() == w["y"]
    assert labels.y.tolist() == fx["labels_y"]


def test_get_starts_fixture_and_short_sequences():
    for case in windows()["get_starts"]:
        assert get_starts(case["total_length"], case["n_ctx"], case["hop_length"]) == case["starts"]
    assert get_starts(100, 64, 16) == [0, 16, 32, 36]
    assert get_starts(64, 64, 8) == [0]
    assert get_starts(40, 64, 8) == [0]  # a single partial window, never a negative start
    with pytest.raises(ValueError):
        get_starts(100, 64, 0)


def write_id_files(tmp_path: Path, version: str) -> LabelIds:
    """Id files holding exactly the names the fixture metas use, with the fixture's ids."""
    artists, genres = {}, {}
    sources = [lyric_fixture(k) for k in TINY + REAL]
    for fx in sources:
        if fx["version"] != version:
            continue
        for meta, y in zip(fx["metas"], fx["labels_y"]):
            gids = [g for g in y[4:4 + fx["G"]] if g >= 0]
            if version == "v3":
                artists[meta["artist"]] = y[3]
                genres[meta["genre"]] = gids[0]
            else:
                artists[normalise_v2_name(meta["artist"])] = y[3]
                genres.update(zip(normalise_v2_name(meta["genre"]).split("_"), gids))
    af, gf = tmp_path / f"{version}_artist_ids.txt", tmp_path / f"{version}_genre_ids.txt"
    af.write_text("".join(f"{k};{v}\n" for k, v in artists.items()), encoding="utf-8")
    gf.write_text("".join(f"{k};{v}\n" for k, v in genres.items()), encoding="utf-8")
    return LabelIds.from_files(af, gf, version)


@pytest.mark.parametrize("key", TINY + REAL)
def test_names_resolve_through_id_files(tmp_path, key):
    fx = lyric_fixture(key)
    ids = write_id_files(tmp_path, fx["version"])
    lab = Labeller(fx["G"], fx["n_tokens"], fx["prior_sample_length"], fx["version"], ids=ids)
    labels = lab.label_batch(fx["metas"])
    assert labels.y.tolist() == fx["labels_y"]
    assert labels.full_tokens == fx["full_tokens"]
    assert LabelIds.from_dir(tmp_path, fx["version"]).artists == ids.artists
    described = lab.describe(labels.y[0])
    assert described["artist"] == ids.artist_key(fx["metas"][0]["artist"])


def test_v2_normalisation_and_reverse_lookup(tmp_path):
    assert normalise_v2_name("  Céline  Dion!! ") == "c_line_dion"
    ids = write_id_files(tmp_path, "v2")
    assert ids.artist_id("CÉLINE---dion") == 557
    assert ids.genre_ids("Blues / Rock") == [2, 8]
    assert ids.genre_name([2, 8, -1]) == "blues_rock"
    ids3 = write_id_files(tmp_path, "v3")
    assert ids3.artist_id("ALAN JACKSON") == 6785
    assert ids3.genre_ids("Blues Rock") == [282]


def test_unknown_names(tmp_path):
    ids = write_id_files(tmp_path, "v2")
    lab = Labeller(5, 0, 8192, "v2", ids=ids)
    with pytest.raises(UnknownLabelError, match="alan_jakson") as err:
        lab.label("Alan Jakson", "Country", "", 40960, 0)
    assert err.value.suggestions[0] == "alan_jackson" and "v2_artist_ids.txt" in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(UnknownLabelError, match="'jazz'"):
        lab.label("Alan Jackson", "Country Jazz", "", 40960, 0)


def test_numeric_ids_need_no_files_and_names_do():
    lab = Labeller(5, 4, 8192, "v2")
    labels = lab.label(3, [1, 4], "Hi there", 40960, 0)
    assert labels.y.tolist() == [[40960, 0, 8192, 3, 1, 4, -1, -1, -1, 8, 35, 77, 46]]
    assert labels.full_tokens == [[8, 35, 77, 46, 34, 31, 44, 31]]
    assert lab.label(3, 7, None, 40960, 0).y[0, 4:9].tolist() == [7, -1, -1, -1, -1]
    with pytest.raises(ValueError, match="id files"):
        lab.label("Alan Jackson", [1], "", 40960, 0)
    with pytest.raises(ValueError, match="id files"):
        lab.label(3, "Country", "", 40960, 0)
    with pytest.raises(ValueError, match="at most 5"):
        lab.label(3, [1, 2, 3, 4, 5, 6], "", 40960, 0)
    with pytest.raises(ValueError, match="v3"):
        Labeller(1, 0, 8192, "v2").label("x", 1, "", 40960, 0,
                                         ids=LabelIds({"x": 1}, {}, "v3"))


def test_relevant_lyric_tokens_padding_and_errors():
    assert relevant_lyric_tokens([5, 6], 4, 100, 0, 10) == ([0, 0, 5, 6], [-1, -1, 0, 1])
    assert relevant_lyric_tokens(list(range(10, 20)), 4, 100, 99, 10) == ([16, 17, 18, 19],
                                                                            [6, 7, 8, 9])
    with pytest.raises(ValueError, match="offset"):
        relevant_lyric_tokens([1] * 10, 4, 100, 100, 10)
    with pytest.raises(ValueError, match="offset"):
        relevant_lyric_tokens([1] * 10, 4, 100, -1, 10)


def test_window_midpoint_is_float32():
    # offset past 2**24 loses its low bits in float32; the midpoint then lands below 500.
    n, total, offset, duration = 1000, 2 ** 25 + 4, 2 ** 24 + 1, 2
    f32 = np.float32
    want32 = int(f32(n) * (f32(offset) + f32(duration) / f32(2.0)) / f32(total))
    want64 = int(n * (offset + duration / 2.0) / total)
    assert (want32, want64) == (499, 500)
    full = list(range(n))
    assert relevant_lyric_tokens(full, 4, total, offset, duration, float32=True)[1] == \
        list(range(want32 - 2, want32 + 2))
    assert relevant_lyric_tokens(full, 4, total, offset, duration)[1] == \
        list(range(want64 - 2, want64 + 2))
    labels = Labels(torch.tensor([[total, offset - 8, 0, 1, 0, 0, 0, 0]]), [full], n_tokens=4)
    y, idx = window_labels(labels, 2, 4, duration, return_indices=True)
    assert idx == [list(range(497, 501))] and y[0, 4:].tolist() == [497, 498, 499, 500]


def test_labels_stack_and_validation():
    lab = Labeller(1, 4, 8192, "v3")
    a = lab.label(1, 2, "abcdef", 40960, 0)
    b = lab.label(3, [4], "xy", 40960, 1024)
    both = Labels.stack([a, b])
    assert len(both) == 2 and both.max_genre_words == 1
    assert both.full_tokens == a.full_tokens + b.full_tokens
    assert torch.equal(both.y, torch.cat([a.y, b.y]))
    assert [i["lyrics"] for i in both.info] == ["abcdef", "xy"]
    with pytest.raises(ValueError, match="different layouts"):
        Labels.stack([a, Labeller(1, 0, 8192, "v3").label(1, 2, "", 40960, 0)])
    with pytest.raises(ValueError, match="full_tokens"):
        Labels.from_y(both.y, n_tokens=4)
    assert lab.describe(b.y[0])["lyrics"] == "xy"
