"""The sampling commands: sample, upsample, continue, encode, decode (with the bundled tiny model)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from fastjukebox.cli import main

SR = 44100
HOPS = (8, 32, 128)


def _length(seconds: float) -> int:
    return int(seconds * SR) // HOPS[-1] * HOPS[-1]


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _codes(path) -> dict[int, np.ndarray]:
    with np.load(path) as f:
        return {int(k[len("codes_level"):]): f[k] for k in f.files if k.startswith("codes_level")}


def _settings(path) -> dict:
    with np.load(path) as f:
        return json.loads(str(f["settings"]))


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """A full three-level run: 2 samples of 0.1 s."""
    d = tmp_path_factory.mktemp("sampled")
    rc = main(["sample", "--model", "tiny", "--seconds", "0.1", "--n-samples", "2", "--seed", "1",
               "--artist", "3", "--genre", "4", "-q", "--out", str(d / "run.wav")])
    assert rc == 0
    return d


@pytest.fixture(scope="module")
def top_only(tmp_path_factory):
    """A top-level-only run: 1 sample of 0.1 s."""
    d = tmp_path_factory.mktemp("top")
    rc = main(["sample", "--model", "tiny", "--seconds", "0.1", "--seed", "5", "--levels", "2", "-q",
               "--out", str(d / "top.wav")])
    assert rc == 0
    return d / "top.npz"


def test_sample_writes_audio_and_codes(sampled):
    n = _length(0.1)
    for i in range(2):
        audio, sr = sf.read(sampled / f"run_{i}.wav", dtype="float32")
        assert sr == SR
        assert audio.shape == (n,)
        assert np.all(np.abs(audio) <= 1.0)
        assert np.abs(audio).max() > 0
    assert not (sampled / "run.wav").exists()
    codes = _codes(sampled / "run.npz")
    assert sorted(codes) == [0, 1, 2]
    for level, z in codes.items():
        assert z.shape == (2, n // HOPS[level])
        assert z.dtype == np.int64 and z.min() >= 0 and z.max() < 64
    s = _settings(sampled / "run.npz")
    assert s["command"] == "sample" and s["model"] == "tiny"
    assert s["seed"] == 1 and s["artist"] == 3 and s["genre"] == 4 and s["n_samples"] == 2


def test_sample_prints_paths(tmp_path, capsys):
    rc, out, _ = _run(capsys, "sample", "--model", "tiny", "--seconds", "0.05", "--levels", "2", "--seed", "0",
                      "-q", "--out", tmp_path / "one.flac")
    assert rc == 0
    assert out.split() == [str(tmp_path / "one.flac"), str(tmp_path / "one.npz")]
    audio, sr = sf.read(tmp_path / "one.flac")
    assert sr == SR and audio.shape == (_length(0.05),)
    assert sorted(_codes(tmp_path / "one.npz")) == [2]


def test_same_seed_same_codes(top_only, tmp_path, capsys):
    argv = ["sample", "--model", "tiny", "--seconds", "0.1", "--levels", "2", "-q"]
    assert _run(capsys, *argv, "--seed", "5", "--out", tmp_path / "again.wav")[0] == 0
    assert _run(capsys, *argv, "--seed", "6", "--out", tmp_path / "other.wav")[0] == 0
    a, b, c = (_codes(p)[2] for p in (top_only, tmp_path / "again.npz", tmp_path / "other.npz"))
    assert a.shape == (1, _length(0.1) // HOPS[2])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_per_level_options(top_only, tmp_path, capsys):
    # a per-level temperature for the sampled level only; the others take the default
    rc, _, err = _run(capsys, "sample", "--model", "tiny", "--seconds", "0.1", "--levels", "2", "--seed", "5",
                      "--temperature", "2=0.99", "--top-k", "0", "--sampler", "2=ar", "-q",
                      "--out", tmp_path / "pl.wav")
    assert rc == 0, err
    np.testing.assert_array_equal(_codes(tmp_path / "pl.npz")[2], _codes(top_only)[2])
    recorded = _settings(tmp_path / "pl.npz")
    assert recorded["temperature"] == 0.99 and recorded["sampler"] == {"2": "ar"}   # as used, level 2 only
    # another temperature for the level is used: other codes from the same seed, recorded as used
    rc, _, err = _run(capsys, "sample", "--model", "tiny", "--seconds", "0.1", "--levels", "2", "--seed", "5",
                      "--temperature", "2=0.5", "-q", "--out", tmp_path / "cold.wav")
    assert rc == 0, err
    assert not np.array_equal(_codes(tmp_path / "cold.npz")[2], _codes(top_only)[2])
    assert _settings(tmp_path / "cold.npz")["temperature"] == 0.5


def test_upsample_keeps_top_and_fills_lower_levels(top_only, tmp_path, capsys):
    rc, out, err = _run(capsys, "upsample", "--model", "tiny", "--codes", top_only, "--seed", "2", "-q",
                        "--out", tmp_path / "up.wav")
    assert rc == 0, err
    n = _length(0.1)
    codes = _codes(tmp_path / "up.npz")
    assert sorted(codes) == [0, 1, 2]
    np.testing.assert_array_equal(codes[2], _codes(top_only)[2])
    for level in (0, 1):
        assert codes[level].shape == (1, n // HOPS[level])
    audio, sr = sf.read(tmp_path / "up.wav")
    assert sr == SR and audio.shape == (n,)
    assert str(tmp_path / "up.wav") in out.split()
    assert _settings(tmp_path / "up.npz")["parent"] == str(top_only)


def test_continue_extends_all_levels(sampled, tmp_path, capsys):
    rc, _, err = _run(capsys, "continue", "--model", "tiny", "--codes", sampled / "run.npz", "--seconds", "0.15",
                      "--seed", "3", "-q", "--out", tmp_path / "more.wav")
    assert rc == 0, err
    before, after = _codes(sampled / "run.npz"), _codes(tmp_path / "more.npz")
    assert sorted(after) == [0, 1, 2]
    n = _length(0.15)
    for level in (0, 1, 2):
        assert after[level].shape == (2, n // HOPS[level])
        assert after[level].shape[1] > before[level].shape[1]
        np.testing.assert_array_equal(after[level][:, :before[level].shape[1]], before[level])
    for i in range(2):
        audio, _ = sf.read(tmp_path / f"more_{i}.wav")
        assert audio.shape == (n,)
    # the labels come from the parent run
    s = _settings(tmp_path / "more.npz")
    assert s["artist"] == 3 and s["genre"] == 4


def test_continue_top_level_only(top_only, tmp_path, capsys):
    rc, _, err = _run(capsys, "continue", "--model", "tiny", "--codes", top_only, "--seconds", "0.2",
                      "--seed", "3", "-q", "--out", tmp_path / "more.wav")
    assert rc == 0, err
    after = _codes(tmp_path / "more.npz")
    assert sorted(after) == [2]
    assert after[2].shape == (1, _length(0.2) // HOPS[2])
    np.testing.assert_array_equal(after[2][:, :_codes(top_only)[2].shape[1]], _codes(top_only)[2])


def test_encode_decode_round_trip(tmp_path, capsys):
    t = np.arange(int(0.1 * 22050)) / 22050
    sf.write(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 22050)  # resampled to 44.1 kHz
    rc, out, err = _run(capsys, "encode", "--model", "tiny", tmp_path / "tone.wav", "--out", tmp_path / "tone.npz")
    assert rc == 0, err
    assert out.split() == [str(tmp_path / "tone.npz")]
    n = _length(0.1)
    codes = _codes(tmp_path / "tone.npz")
    assert {l: z.shape for l, z in codes.items()} == {l: (1, n // HOPS[l]) for l in range(3)}
    for level in (0, 2):
        rc, out, err = _run(capsys, "decode", "--model", "tiny", "--codes", tmp_path / "tone.npz",
                            "--level", level, "--out", tmp_path / f"dec{level}.wav")
        assert rc == 0, err
        audio, sr = sf.read(tmp_path / f"dec{level}.wav")
        assert sr == SR and audio.shape == (n,)
        assert np.all(np.abs(audio) <= 1.0)


def test_sample_continues_a_prompt(tmp_path, capsys):
    t = np.arange(int(0.1 * SR)) / SR
    sf.write(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * 330 * t), SR)
    assert _run(capsys, "encode", "--model", "tiny", tmp_path / "tone.wav", "--out", tmp_path / "tone.npz")[0] == 0
    rc, _, err = _run(capsys, "sample", "--model", "tiny", "--prompt", tmp_path / "tone.wav", "--seconds", "0.15",
                      "--levels", "2", "--seed", "1", "-q", "--out", tmp_path / "cont.wav")
    assert rc == 0, err
    prompt, out = _codes(tmp_path / "tone.npz")[2], _codes(tmp_path / "cont.npz")[2]
    assert out.shape == (1, _length(0.15) // HOPS[2])
    np.testing.assert_array_equal(out[:, :prompt.shape[1]], prompt)
    assert _settings(tmp_path / "cont.npz")["prompt"] == str(tmp_path / "tone.wav")


def test_names_with_id_files(top_only, tmp_path, capsys):
    (tmp_path / "artists.txt").write_text("unknown;0\nthe_beatles;7\n", encoding="utf-8")
    (tmp_path / "genres.txt").write_text("unknown;0\nrock;2\n", encoding="utf-8")
    common = ["sample", "--model", "tiny", "--seconds", "0.1", "--levels", "2", "--seed", "5", "-q"]
    rc, _, err = _run(capsys, *common, "--artist", "The Beatles", "--genre", "Rock",
                      "--artist-ids", tmp_path / "artists.txt", "--genre-ids", tmp_path / "genres.txt",
                      "--out", tmp_path / "named.wav")
    assert rc == 0, err
    rc, _, err = _run(capsys, *common, "--artist", "7", "--genre", "2", "--out", tmp_path / "ids.wav")
    assert rc == 0, err
    named, ids = _codes(tmp_path / "named.npz")[2], _codes(tmp_path / "ids.npz")[2]
    np.testing.assert_array_equal(named, ids)
    assert not np.array_equal(named, _codes(top_only)[2])  # artist 0, genre 0


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "noise.wav").write_bytes(b"this is not audio at all")
    np.savez(tmp_path / "nocodes.npz", other=np.zeros(3))
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "text.npz").write_text("hello")
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["sample", "--model", "tiny", "--artist", "Nobody"], "names need"),
    (["sample", "--model", "no_such_model"], "'no_such_model' is not a model directory"),
    (["sample", "--model", "tiny", "--prompt", "{d}/noise.wav"], "cannot read audio file"),
    (["sample", "--model", "tiny", "--prompt", "{d}/missing.wav"], "no such file"),
    (["sample", "--model", "tiny", "--sampler", "1=fast"], "unknown sampler 'fast'"),
    (["sample", "--model", "tiny", "--sampler", "parallel"], "no parallel student for level 1"),
    (["sample", "--model", "tiny", "--artist", "99"], "artist id"),
    (["sample", "--model", "tiny", "--temperature", "7=0.5"], "it samples level(s) 2, 1, 0"),
    (["sample", "--model", "tiny", "--out", "{d}/x.mp3"], ".wav or .flac"),
    (["upsample", "--model", "tiny", "--codes", "{d}/missing.npz"], "no such file"),
    (["upsample", "--model", "tiny", "--codes", "{d}/nocodes.npz"], "no codes arrays"),
    (["upsample", "--model", "tiny", "--codes", "{d}/corrupt.npz"], "not a valid .npz"),
    (["continue", "--model", "tiny", "--codes", "{d}/text.npz", "--seconds", "1"], "not a valid .npz"),
    (["decode", "--model", "tiny", "--codes", "{d}/missing.npz"], "no such file"),
    (["encode", "--model", "tiny", "{d}/noise.wav", "--out", "{d}/c.npz"], "cannot read audio file"),
])
def test_bad_input_exits_2(bad_files, capsys, argv, message):
    argv = [a.format(d=bad_files) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(bad_files / "out.wav")]
    rc, out, err = _run(capsys, *argv, *(["--seconds", "0.05", "-q"] if argv[0] == "sample" else []))
    assert rc == 2
    assert f"fastjukebox {argv[0]}: error:" in err
    assert message in err
    assert not (bad_files / "out.wav").exists() and not (bad_files / "out.npz").exists()


def test_upsample_needs_top_level(sampled, tmp_path, capsys):
    z = _codes(sampled / "run.npz")
    np.savez(tmp_path / "low.npz", codes_level0=z[0], codes_level1=z[1])
    rc, _, err = _run(capsys, "upsample", "--model", "tiny", "--codes", tmp_path / "low.npz",
                      "--out", tmp_path / "up.wav")
    assert rc == 2 and "no top-level codes" in err


def test_bad_option_values_are_rejected(capsys):
    for argv in (["sample", "--model", "tiny", "--temperature", "hot"],
                 ["sample", "--model", "tiny", "--levels", "2,x"],
                 ["sample", "--model", "tiny", "--seconds", "-1"],
                 ["sample", "--model", "tiny", "--lyrics", "a", "--lyrics-file", "b"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    capsys.readouterr()
