"""``tonal_fraction``: pitched sound scores high, noise low, and mixtures in between.
``score_agreement``: audio that plays a score's notes matches its text, other notes do not."""
import numpy as np
import pytest
import torch

from fastjukebox.demo.evaluate import chroma_per_cell, score_agreement, tonal_fraction
from fastjukebox.demo.score_text import GRID_SECONDS, score_text
from fastjukebox.demo.scores import ScoreEvents

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


# Two chords of one second each (MIDI pitches, soprano to bass), then the same progression moved.
PROGRESSION = [(72, 67, 64, 48), (74, 71, 67, 55)]      # C major, then G major
ELSEWHERE = [(73, 70, 66, 54), (75, 72, 68, 56)]        # F# major, then G# major: no common tones


def _events(chords, seconds=1.0) -> ScoreEvents:
    onset, pitch, voice = [], [], []
    for k, chord in enumerate(chords):
        for v, p in enumerate(chord):
            onset.append(k * seconds)
            pitch.append(p)
            voice.append(v)
    n = len(onset)
    return ScoreEvents(name="t", source="", onset=np.array(onset), duration=np.full(n, seconds),
                       pitch=np.array(pitch), voice=np.array(voice), tonic="C", mode="major", n_parts=4,
                       tempo_qpm=60.0)


def _play(chords, seconds=1.0, seed=0) -> np.ndarray:
    return np.concatenate([_chord(seconds, [440.0 * 2 ** ((p - 69) / 12) for p in c], seed=seed + k)
                           for k, c in enumerate(chords)])


def test_audio_agrees_with_its_own_score():
    audio = _play(PROGRESSION)
    own = score_agreement(audio, score_text(_events(PROGRESSION), len(audio)))
    moved = score_agreement(audio, score_text(_events(ELSEWHERE), len(audio)))
    swapped = score_agreement(audio, score_text(_events(PROGRESSION[::-1]), len(audio)))
    assert own > 0.75, own
    assert moved < 0.35, moved
    assert moved < swapped < own                # the right chords at the wrong times: in between
    noise = np.random.default_rng(4).standard_normal(len(audio)).astype(np.float32)
    assert score_agreement(noise, score_text(_events(PROGRESSION), len(audio))) < own - 0.3


def test_chroma_finds_the_pitch_classes():
    audio = _play([(69, 64, 61, 57)])           # A major: A, E, C#
    chroma = chroma_per_cell(audio, GRID_SECONDS, SR)
    assert chroma.shape == (int(1.0 / GRID_SECONDS), 12)
    assert np.allclose(chroma.sum(-1), 1.0)
    top3 = set(np.argsort(chroma.mean(0))[-3:].tolist())
    assert top3 == {9, 4, 1}
    assert (chroma_per_cell(np.zeros(SR), GRID_SECONDS, SR) == 0).all()


def test_score_agreement_bad_input():
    audio = _play(PROGRESSION)
    with pytest.raises(ValueError, match="whole cells"):
        score_agreement(audio, "abc")
    with pytest.raises(ValueError, match="shorter than one cell"):
        score_agreement(audio[:100], "aaaa")
    with pytest.raises(ValueError, match="no cell"):
        score_agreement(np.zeros(SR, dtype=np.float32), "aaaa" * 8)
    with pytest.raises(ValueError, match="no cell"):
        score_agreement(audio, "...." * 8)
