import os
import subprocess
import sys
from pathlib import Path

if not (Path(__file__).parent / "conftest.py").exists():
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from fastjukebox import audio
from fastjukebox.audio import AudioError, load_audio, resample, save_audio

ROOT = Path(__file__).resolve().parent.parent
PCM16_TOL = 2.0 / 32768  # one step of 16-bit quantisation, plus libsndfile's 32767/32768 scaling


@pytest.fixture
def sf():
    return pytest.importorskip("soundfile")


def tone(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    n = np.arange(int(round(sr * seconds)))
    return (amp * np.sin(2 * np.pi * freq * n / sr)).astype(np.float32)


def spectrum(y, sr: int) -> np.ndarray:
    """Amplitude spectrum of the middle second of y: bin k is k Hz, a sine of amplitude a at an
    integer frequency shows as a in its bin (no leakage, the edges are left out)."""
    y = np.asarray(y, dtype=np.float64)
    start = (len(y) - sr) // 2
    assert start > 0
    seg = y[start:start + sr]
    return np.abs(np.fft.rfft(seg)) * 2 / len(seg)


def power_db(amplitudes: np.ndarray, ref_amp: float) -> float:
    return 10 * np.log10(max(float((amplitudes ** 2).sum()), 1e-30) / ref_amp ** 2)


# ---------------------------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_round_trip(tmp_path, sf, suffix):
    x = tone(440, 44100, 0.25)
    out = save_audio(tmp_path / f"tone{suffix}", torch.from_numpy(x))
    assert out == tmp_path / f"tone{suffix}"
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (44100, 1, len(x), "PCM_16")
    y = load_audio(out, resample=False)
    assert y.dtype == torch.float32 and y.shape == (len(x),)
    np.testing.assert_allclose(y.numpy(), x, rtol=0, atol=PCM16_TOL)
    assert float((y.numpy() - x).std()) > 0  # really went through 16-bit PCM


def test_subtype_override(tmp_path, sf):
    x = tone(440, 44100, 0.05)
    out = save_audio(tmp_path / "t.wav", x, subtype="float")
    assert sf.info(str(out)).subtype == "FLOAT"
    np.testing.assert_array_equal(load_audio(out).numpy(), x)
    with pytest.raises(AudioError, match="FLOAT.*FLAC|FLAC.*FLOAT|subtype"):
        save_audio(tmp_path / "t.flac", x, subtype="FLOAT")
    assert not (tmp_path / "t.flac").exists()


def test_stereo_downmix_is_channel_mean(tmp_path, sf):
    left, right = tone(440, 44100, 0.1, 0.8), tone(1234, 44100, 0.1, -0.3)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    y = load_audio(path)
    assert y.shape == left.shape
    np.testing.assert_allclose(y.numpy(), (left + right) / 2, rtol=0, atol=1e-7)


def test_load_resamples_to_model_rate(tmp_path, sf):
    x = tone(1000, 22050, 1.5)
    path = tmp_path / "low.wav"
    sf.write(str(path), x, 22050, subtype="FLOAT")
    y = load_audio(path, sr=44100)
    assert y.dtype == torch.float32 and y.shape == (2 * len(x),)
    torch.testing.assert_close(y, resample(torch.from_numpy(x), 22050, 44100), rtol=0, atol=1e-7)


def test_resample_false_rejects_other_rate(tmp_path, sf):
    path = tmp_path / "low.wav"
    sf.write(str(path), tone(440, 22050, 0.1), 22050)
    with pytest.raises(AudioError) as err:
        load_audio(path, sr=44100, resample=False)
    assert "22050" in str(err.value) and "44100" in str(err.value)
    assert load_audio(path, sr=22050, resample=False).shape == (2205,)


def test_offset_and_duration(tmp_path, sf):
    x = tone(440, 44100, 1.0)
    path = tmp_path / "t.wav"
    sf.write(str(path), x, 44100, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path, offset=0.25, duration=0.5).numpy(),
                                  x[11025:33075])
    np.testing.assert_array_equal(load_audio(path, offset=0.75).numpy(), x[33075:])
    np.testing.assert_array_equal(load_audio(path, offset=0.9, duration=5.0).numpy(), x[39690:])
    with pytest.raises(AudioError, match="beyond the end"):
        load_audio(path, offset=1.0)
    with pytest.raises(AudioError, match="offset"):
        load_audio(path, offset=-0.1)
    with pytest.raises(AudioError, match="duration"):
        load_audio(path, duration=0)


def test_resampled_segment_matches_resampled_whole(tmp_path, sf):
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal(48000)).astype(np.float32)
    path = tmp_path / "noise.wav"
    sf.write(str(path), x, 48000, subtype="FLOAT")
    whole = load_audio(path, sr=44100)
    part = load_audio(path, sr=44100, offset=0.5, duration=0.25)
    assert part.shape == (11025,)
    # context is read around the segment, so its ends are not zero-padded transients
    torch.testing.assert_close(part, whole[22050:33075], rtol=0, atol=1e-6)


def test_missing_file(tmp_path, sf):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="nope.wav"):
        load_audio(path)


def test_garbage_file(tmp_path, sf):
    path = tmp_path / "garbage.wav"
    path.write_bytes(b"this is not a RIFF header at all" * 40)
    with pytest.raises(AudioError, match="garbage.wav") as err:
        load_audio(path)
    assert "not" in str(err.value).split("garbage.wav")[-1].lower()  # soundfile's reason follows


def test_empty_files(tmp_path, sf):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav.*empty"):
        load_audio(empty)
    header_only = tmp_path / "header.wav"
    sf.write(str(header_only), np.zeros(0, dtype=np.float32), 44100)
    assert header_only.stat().st_size > 0
    with pytest.raises(AudioError, match="header.wav.*no audio samples"):
        load_audio(header_only)


def test_save_clips(tmp_path, sf):
    x = np.array([0.0, 1.5, -2.0, 0.5, 1.0, -1.0, 3.0, -0.25], dtype=np.float32)
    for name, subtype, tol in (("c.wav", "PCM_16", PCM16_TOL), ("c.flac", "PCM_16", PCM16_TOL),
                               ("f.wav", "FLOAT", 0.0)):
        path = save_audio(tmp_path / name, x, subtype=subtype)
        y, _ = sf.read(str(path), dtype="float64")  # the file itself, not load_audio's output
        np.testing.assert_allclose(y, np.clip(x, -1, 1), rtol=0, atol=tol)


def test_unknown_suffix(tmp_path, sf):
    with pytest.raises(AudioError) as err:
        save_audio(tmp_path / "out.mp3", tone(440, 44100, 0.01))
    assert ".wav" in str(err.value) and ".flac" in str(err.value) and ".mp3" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_save_batch_writes_one_file_per_row(tmp_path, sf):
    batch = np.stack([tone(220 * (i + 1), 44100, 0.05) for i in range(3)])
    paths = save_audio(tmp_path / "song.flac", torch.from_numpy(batch))
    assert paths == [tmp_path / f"song_{i}.flac" for i in range(3)]
    assert sorted(tmp_path.iterdir()) == paths
    for row, path in zip(batch, paths):
        np.testing.assert_allclose(load_audio(path).numpy(), row, rtol=0, atol=PCM16_TOL)
    assert save_audio(tmp_path / "one.wav", batch[:1]) == [tmp_path / "one.wav"]


def test_save_is_atomic(tmp_path, sf, monkeypatch):
    target = tmp_path / "keep.wav"
    save_audio(target, tone(440, 44100, 0.05))
    before = target.read_bytes()

    def broken_write(file, data, samplerate, **kwargs):
        file.write(b"RIFF half a file")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sf, "write", broken_write)
    with pytest.raises(AudioError, match="disk on fire"):
        save_audio(target, tone(880, 44100, 0.05))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.wav"]  # no temporary file left


def test_missing_soundfile_message(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "soundfile", None)
    with pytest.raises(ImportError, match="pip install soundfile"):
        load_audio(tmp_path / "x.wav")
    with pytest.raises(ImportError, match="pip install soundfile"):
        save_audio(tmp_path / "x.wav", np.zeros(4, np.float32))


def test_module_does_not_import_soundfile():
    code = ("import sys; sys.modules['soundfile'] = None\n"
            "import torch, fastjukebox.audio as a\n"
            "print(a.resample(torch.ones(8), 22050, 44100).shape[0])\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "16"


# ---------------------------------------------------------------------------------- resampling


def test_upsample_keeps_frequency_and_amplitude():
    y = resample(torch.from_numpy(tone(1000, 22050, 3.0, amp=0.5)), 22050, 44100)
    assert y.dtype == torch.float32 and y.shape == (132300,)
    spec = spectrum(y, 44100)
    assert int(spec.argmax()) == 1000
    assert spec[1000] == pytest.approx(0.5, rel=0.01)


def test_downsample_tone_in_transition_band_does_not_alias():
    # 21 kHz is below the new Nyquist (22.05 kHz) but above the documented pass band (0.909 of
    # it): it comes out at 21 kHz, attenuated, and nothing lands anywhere else
    y = resample(torch.from_numpy(tone(21000, 48000, 3.0, amp=0.5)), 48000, 44100)
    assert y.shape == (132300,)
    spec = spectrum(y, 44100)
    assert int(spec.argmax()) == 21000
    assert spec[21000] < 0.5 * 0.9
    others = np.delete(spec, np.arange(20998, 21003))
    assert power_db(others, 0.5) < -40


def test_downsample_rejects_content_above_new_nyquist():
    # 23 kHz cannot exist at 44.1 kHz; without a low-pass it would alias to 21.1 kHz at almost
    # full amplitude. The stop band is specified at >= 90 dB; allow some margin.
    y = resample(torch.from_numpy(tone(23000, 48000, 3.0, amp=0.5)), 48000, 44100)
    assert power_db(spectrum(y, 44100), 0.5) < -80


def test_upsample_rejects_images():
    y = resample(torch.from_numpy(tone(10000, 22050, 3.0, amp=0.5)), 22050, 44100)
    spec = spectrum(y, 44100)
    assert spec[10000] == pytest.approx(0.5, rel=1e-3)
    assert power_db(spec[11025:], 0.5) < -80  # image at 22050 - 10000 = 12050 Hz


def test_resample_shapes_lengths_and_dc():
    x = torch.rand(3, 1000, dtype=torch.float64) - 0.5
    y = resample(x, 44100, 16000)
    assert y.shape == (3, 363) and y.dtype == torch.float64  # ceil(1000 * 16000 / 44100)
    for i in range(3):
        torch.testing.assert_close(resample(x[i], 44100, 16000), y[i], rtol=0, atol=1e-12)
    assert resample(x, 44100, 44100) is x
    assert resample(np.zeros(10, np.float32), 8000, 44100).shape == (56,)
    dc = resample(torch.full((4000,), 0.25, dtype=torch.float64), 48000, 44100)
    torch.testing.assert_close(dc[200:-200], torch.full_like(dc[200:-200], 0.25), rtol=0, atol=1e-12)
    with pytest.raises(AudioError):
        resample(torch.zeros(2, 2, 2), 1, 2)
    with pytest.raises(AudioError):
        resample(torch.zeros(4, dtype=torch.int16), 1, 2)
    with pytest.raises(AudioError):
        resample(torch.zeros(4), 44100.5, 48000)


def test_resample_is_deterministic():
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(20000).astype(np.float32))
    assert torch.equal(resample(x, 48000, 44100), resample(x.clone(), 48000, 44100))


def test_compact_path_matches_filter_bank(monkeypatch):
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 3000))).to(torch.float64)
    bank = resample(x, 48000, 44100)
    monkeypatch.setattr(audio, "_MAX_BANK", 1000)  # forces the per-phase gather form
    gathered = resample(x, 48000, 44100)
    torch.testing.assert_close(gathered, bank, rtol=0, atol=1e-12)


def test_awkward_ratio_keeps_frequency():
    # 44056 / 44100 reduce to 11014 / 11025 phases: the compact form is used
    y = resample(torch.from_numpy(tone(5000, 44056, 2.5)), 44056, 44100)
    assert y.shape == (110250,)
    spec = spectrum(y, 44100)
    assert int(spec.argmax()) == 5000
    assert spec[5000] == pytest.approx(0.5, rel=1e-3)
    assert power_db(np.delete(spec, np.arange(4998, 5003)), 0.5) < -80
