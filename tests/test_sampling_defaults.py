"""A family's recommended sampling settings (``sampling.json``): parsing, errors, use by the API
and the CLI, and that a caller's own value always wins."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import fastjukebox as fj
from fastjukebox.bundle import ASSETS
from fastjukebox.checkpoint import CheckpointError
from fastjukebox.cli import main
from fastjukebox.sampling_defaults import SAMPLING_FILE, SamplingDefaults

LEVELS = 3
TOP_T = 0.35      # far from the built-in 0.99, so using it or not changes the sampled codes


@pytest.fixture()
def tiny_with_defaults(tmp_path):
    """The bundled tiny family with a sampling.json that lowers the top level's temperature."""
    d = tmp_path / "tiny"
    shutil.copytree(ASSETS / "tiny", d)
    (d / SAMPLING_FILE).write_text(json.dumps({"temperature": {"2": TOP_T}}))
    return d


def _top_codes(jb, seed: int = 3, **sampling) -> torch.Tensor:
    return jb.sample(seconds=0.2, levels=(2,), seed=seed, progress=False, **sampling).codes[2]


def test_values_per_level_and_their_use():
    d = SamplingDefaults(LEVELS, {"temperature": {"2": 0.8}, "top_p": 0.9})
    assert [d.value("temperature", l) for l in range(LEVELS)] == [0.99, 0.99, 0.8]
    assert d.per_level("temperature") == {0: 0.99, 1: 0.99, 2: 0.8}
    assert d.per_level("top_p") == {0: 0.9, 1: 0.9, 2: 0.9}
    assert d.per_level("top_k") == 0                         # not overridden: the built-in value
    jb = fj.load("tiny")
    jb.sampling_defaults = d
    used = jb.resolve_sampling((2, 1, 0), {"temperature": 0.5, "top_k": None, "seed": 1})
    assert (used["temperature"], used["top_k"], used["top_p"], used["seed"]) == \
        ({2: 0.5, 1: 0.5, 0: 0.5}, {2: 0, 1: 0, 0: 0}, {2: 0.9, 1: 0.9, 0: 0.9}, 1)
    jb.sampling_defaults = SamplingDefaults(LEVELS)
    used = jb.resolve_sampling((2, 1, 0), {})
    assert (used["temperature"], used["top_k"], used["top_p"]) == ({2: 0.99, 1: 0.99, 0: 0.99}, {2: 0, 1: 0, 0: 0},
                                                                   {2: 0.0, 1: 0.0, 0: 0.0})
    # a per-level mapping is completed with the family's values for the levels it leaves out
    jb.sampling_defaults = d
    assert jb.resolve_sampling((2, 1, 0), {"temperature": {0: 0.5}})["temperature"] == {0: 0.5, 1: 0.99, 2: 0.8}
    with pytest.raises(ValueError, match=r"temperature names level\(s\) 7, which this call does not sample"):
        jb.resolve_sampling((2, 1, 0), {"temperature": {7: 0.5}})


@pytest.mark.parametrize("settings, message", [
    ({"temprature": 0.9}, "unknown field 'temprature'"),
    ({"temperature": {"5": 0.9}}, "names level 5"),
    ({"temperature": {"top": 0.9}}, "level 'top' is not a level number"),
    ({"temperature": -0.5}, "must be a finite number >= 0"),
    ({"temperature": float("nan")}, "must be a finite number >= 0"),
    ({"temperature": True}, "must be a finite number >= 0"),
    ({"top_k": 2.5}, "must be an integer >= 0"),
    ({"top_p": {"1": 1.5}}, "must be a number in [0, 1]"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(CheckpointError) as e:
        SamplingDefaults(LEVELS, settings)
    assert message in str(e.value)


@pytest.mark.parametrize("text, message", [("{not json", "not a readable JSON file"),
                                           ("[0.9]", "expected a JSON object")])
def test_unreadable_file_is_named(tmp_path, text, message):
    (tmp_path / SAMPLING_FILE).write_text(text)
    with pytest.raises(CheckpointError, match="sampling.json") as e:
        SamplingDefaults.load(tmp_path, LEVELS)
    assert message in str(e.value)


def test_no_file_means_builtin(tmp_path):
    assert SamplingDefaults.load(tmp_path, LEVELS).overrides == {}


def test_family_defaults_are_used_and_a_given_value_wins(tiny_with_defaults):
    jb = fj.load(tiny_with_defaults)
    plain = fj.load("tiny")
    assert jb.sampling_defaults.value("temperature", 2) == TOP_T
    assert plain.sampling_defaults.overrides == {}
    with_defaults = _top_codes(jb)
    torch.testing.assert_close(with_defaults, _top_codes(plain, temperature={2: TOP_T}))
    assert not torch.equal(with_defaults, _top_codes(plain))
    torch.testing.assert_close(_top_codes(jb, temperature=0.99), _top_codes(plain))   # the caller's value wins
    # levels left out: the family's (a sample of every level with only level 0 set)
    torch.testing.assert_close(jb.sample(seconds=0.2, seed=3, progress=False, temperature={0: 0.9}).codes[2],
                               with_defaults)
    with pytest.raises(ValueError, match=r"names level\(s\) 0, which this call does not sample; it samples "
                                         r"level\(s\) 2"):
        _top_codes(jb, temperature={0: 0.9})          # a level the call does not sample


def test_save_round_trip_and_stale_file_removed(tiny_with_defaults, tmp_path):
    jb = fj.load(tiny_with_defaults)
    out = jb.save(tmp_path / "copy")
    assert json.loads((out / SAMPLING_FILE).read_text()) == {"temperature": {"2": TOP_T}}
    assert fj.load(out).sampling_defaults.per_level("temperature") == {0: 0.99, 1: 0.99, 2: TOP_T}
    fj.load("tiny").save(out)                                 # a family without settings, same place
    assert not (out / SAMPLING_FILE).exists()


def _cli_top(tmp_path, model, name: str, *extra) -> tuple[np.ndarray, dict]:
    rc = main(["sample", "--model", str(model), "--seconds", "0.2", "--levels", "2", "--seed", "3", "-q",
               "--out", str(tmp_path / f"{name}.wav"), *extra])
    assert rc == 0
    with np.load(tmp_path / f"{name}.npz") as f:
        return f["codes_level2"], json.loads(str(f["settings"]))


def test_cli_uses_family_defaults_for_what_it_is_not_given(tiny_with_defaults, tmp_path):
    codes, settings = _cli_top(tmp_path, tiny_with_defaults, "family")
    assert settings["temperature"] == TOP_T          # as used at the one sampled level, 2
    assert settings["top_k"] == 0 and settings["top_p"] == 0.0
    explicit, _ = _cli_top(tmp_path, "tiny", "explicit", "--temperature", f"2={TOP_T}")
    np.testing.assert_array_equal(codes, explicit)
    # a per-level option naming only levels the run does not sample is refused
    with pytest.raises(AssertionError):
        _cli_top(tmp_path, tiny_with_defaults, "partial", "--temperature", "0=0.9")
    assert not (tmp_path / "partial.npz").exists()
    # one value for all levels replaces the family's
    overridden, one = _cli_top(tmp_path, tiny_with_defaults, "one", "--temperature", "0.99")
    assert one["temperature"] == 0.99
    plain, _ = _cli_top(tmp_path, "tiny", "plain")
    np.testing.assert_array_equal(overridden, plain)
    assert not np.array_equal(codes, plain)


def test_info_shows_family_settings(tiny_with_defaults, capsys):
    assert main(["info", str(tiny_with_defaults)]) == 0
    out = capsys.readouterr().out
    assert 'recommended sampling settings (sampling.json): {"temperature": {"2": 0.35}}' in out
    assert main(["info", "tiny"]) == 0
    assert "sampling.json" not in capsys.readouterr().out


def test_the_builtin_defaults_are_the_named_constants():
    """The default temperature (the original's upsampler default) and chunk size are written once
    (``fastjukebox.settings``) and are what every default of the sampling code is."""
    import inspect

    from fastjukebox.decoding import WindowDecoder
    from fastjukebox.sampling import sample_levels, sample_window
    from fastjukebox.sampling_defaults import BUILTIN
    from fastjukebox.settings import DEFAULT_CHUNK_SIZE, DEFAULT_TEMPERATURE, KNOB_RULES
    assert (DEFAULT_TEMPERATURE, DEFAULT_CHUNK_SIZE) == (0.99, 32)
    assert BUILTIN["temperature"] == DEFAULT_TEMPERATURE and KNOB_RULES["chunk_size"][2] == DEFAULT_CHUNK_SIZE
    levels = inspect.signature(sample_levels).parameters
    assert levels["temperature"].default == DEFAULT_TEMPERATURE and levels["chunk_size"].default == DEFAULT_CHUNK_SIZE
    for fn in (sample_window, WindowDecoder.prime):     # GraphWindowSampler passes its knobs to sample_window
        assert inspect.signature(fn).parameters["chunk_size"].default == DEFAULT_CHUNK_SIZE, fn
