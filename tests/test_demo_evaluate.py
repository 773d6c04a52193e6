"""``tonal_fraction``: pitched sound scores high, noise low, and mixtures in between."""
import numpy as np
import pytest
import torch

from fastjukebox.demo.evaluate import tonal_fraction

SR = 44100


def _chord(seconds=1.0, freqs=(196.0, 261.6, 329.6, 392.0), seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    out = np.zeros_like(t)
    for f in freqs:
        for h in range(1, 6):                      # five harmonics, decaying
            out += np.sin(2 * np.pi * f * h * t + rng.uniform(0, 2 * np.pi)) / h
    return (out / np.abs(out).max()).astype(np.float32)


def test_chord_is_tonal_and_noise_is_not():
    noise = np.random.default_rng(1).standard_normal(SR).astype(np.float32)
    assert tonal_fraction(_chord()) > 0.9
    assert tonal_fraction(noise) < 0.1


def test_mixture_scores_between_and_falls_with_noise():
    chord = _chord()
    noise = np.random.default_rng(2).standard_normal(SR).astype(np.float32)
    noise *= np.sqrt((chord ** 2).mean() / (noise ** 2).mean())
    scores = [tonal_fraction(chord + g * noise) for g in (0.0, 0.3, 1.0, 3.0)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert 0.1 < scores[2] < 0.9


def test_level_and_shape_do_not_matter():
    chord = _chord(seed=3)
    a = tonal_fraction(chord)
    assert tonal_fraction(0.01 * chord) == pytest.approx(a, abs=1e-6)
    assert tonal_fraction(torch.from_numpy(chord)[None]) == pytest.approx(a, abs=1e-6)


def test_silence_and_short_input():
    assert tonal_fraction(np.zeros(SR, dtype=np.float32)) == 0.0
    with pytest.raises(ValueError, match="at least 4096 samples"):
        tonal_fraction(np.ones(100, dtype=np.float32))
