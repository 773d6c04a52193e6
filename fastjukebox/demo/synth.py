"""A small deterministic additive synthesizer: note events -> 44.1 kHz mono int16.

Each timbre is a harmonic spectrum (one amplitude per harmonic) stored as band-limited
wavetables, shaped by an ADSR envelope, a delayed vibrato (phase modulation) and, for wind
timbres, band-passed breath noise. The dry mix goes through a short reverb (a seeded,
exponentially decaying and darkening noise impulse response plus a few early reflections,
convolved by FFT) and is peak-normalised to ``peak_dbfs``.

Everything is float64. Randomness comes from ``numpy.random.PCG64(seed).random_raw``, whose
bit stream numpy keeps stable across versions, so a render depends only on its inputs.
Notes are rendered once per distinct ``(timbre, pitch, length)`` in a call and reused: a
chorale repeats few of them, which makes rendering fast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

SR = 44100


@dataclass(frozen=True)
class Timbre:
    """One instrument voice.

    harmonics: amplitude of harmonic 1, 2, ... (the fundamental first).
    attack, decay, release: seconds; sustain: level in (0, 1]. The release follows note-off.
    vibrato_cents, vibrato_hz, vibrato_delay: depth, rate and fade-in start of the vibrato.
    breath: level of band-passed noise that follows the envelope (0 for none).
    gain: mix level of this timbre.
    """

    name: str
    harmonics: tuple[float, ...]
    attack: float = 0.03
    decay: float = 0.1
    sustain: float = 0.8
    release: float = 0.08
    vibrato_cents: float = 0.0
    vibrato_hz: float = 5.5
    vibrato_delay: float = 0.15
    breath: float = 0.0
    gain: float = 1.0

    def __post_init__(self):
        if not self.harmonics or self.harmonics[0] <= 0 or min(self.harmonics) < 0:
            raise ValueError(f"timbre {self.name!r}: harmonics must be >= 0 with a positive fundamental")
        if min(self.attack, self.decay, self.release) <= 0 or not 0 < self.sustain <= 1:
            raise ValueError(f"timbre {self.name!r}: attack/decay/release must be > 0 and 0 < sustain <= 1")


def _power(n: int, slope: float, formant: tuple[int, float] | None = None) -> tuple[float, ...]:
    """1/k**slope harmonic amplitudes, optionally boosted around harmonic ``formant[0]``."""
    k = np.arange(1, n + 1, dtype=np.float64)
    a = k ** -slope
    if formant is not None:
        a = a * (1 + formant[1] * np.exp(-0.5 * ((k - formant[0]) / 1.5) ** 2))
    return tuple(float(x) for x in a / a.max())


TIMBRES: dict[str, Timbre] = {t.name: t for t in (
    Timbre("flute", (1.0, 0.42, 0.16, 0.07, 0.035, 0.015), attack=0.06, decay=0.12, sustain=0.85,
           release=0.09, vibrato_cents=12, vibrato_hz=5.0, breath=0.05, gain=0.9),
    Timbre("oboe", (0.55, 1.0, 0.9, 0.75, 0.6, 0.45, 0.35, 0.25, 0.15, 0.1, 0.06), attack=0.03,
           decay=0.08, sustain=0.8, release=0.06, vibrato_cents=8, vibrato_hz=5.6, breath=0.015, gain=0.7),
    Timbre("clarinet", (1.0, 0.04, 0.6, 0.03, 0.38, 0.03, 0.22, 0.02, 0.13, 0.01, 0.08, 0.01, 0.05),
           attack=0.035, decay=0.1, sustain=0.85, release=0.07, vibrato_cents=4, vibrato_hz=5.2,
           breath=0.02, gain=0.8),
    Timbre("bassoon", (1.0, 0.85, 0.4, 0.45, 0.2, 0.1, 0.08, 0.04), attack=0.04, decay=0.1,
           sustain=0.8, release=0.07, vibrato_cents=5, vibrato_hz=5.0, breath=0.01, gain=0.9),
    Timbre("violin", _power(16, 0.7, (6, 1.0)), attack=0.11, decay=0.15, sustain=0.9, release=0.1,
           vibrato_cents=16, vibrato_hz=5.8, vibrato_delay=0.12, gain=0.65),
    Timbre("viola", _power(14, 1.2, (3, 0.8)), attack=0.12, decay=0.15, sustain=0.9, release=0.1,
           vibrato_cents=14, vibrato_hz=5.5, gain=0.7),
    Timbre("cello", _power(14, 1.6, (2, 0.5)), attack=0.13, decay=0.18, sustain=0.9, release=0.12,
           vibrato_cents=12, vibrato_hz=5.2, gain=0.85),
    Timbre("double_bass", _power(10, 2.4), attack=0.09, decay=0.2, sustain=0.85, release=0.14,
           vibrato_cents=8, vibrato_hz=5.0, gain=1.0),
    Timbre("principal", (1.0, 0.55, 0.28, 0.3, 0.1, 0.15, 0.04, 0.12, 0.03, 0.05), attack=0.015,
           decay=0.05, sustain=1.0, release=0.04, gain=0.7),
    Timbre("gedackt", (1.0, 0.06, 0.3, 0.03, 0.08, 0.01, 0.03), attack=0.02, decay=0.05, sustain=1.0,
           release=0.04, breath=0.008, gain=0.85),
    Timbre("gamba", _power(12, 0.6), attack=0.025, decay=0.05, sustain=1.0, release=0.04, gain=0.55),
    Timbre("pedal", (1.0, 0.45, 0.18, 0.08, 0.03), attack=0.03, decay=0.05,
           sustain=1.0, release=0.06, gain=1.0),
    Timbre("trumpet", (0.6, 0.9, 1.0, 0.95, 0.8, 0.65, 0.5, 0.38, 0.27, 0.18, 0.12, 0.08),
           attack=0.035, decay=0.12, sustain=0.75, release=0.07, vibrato_cents=5, vibrato_hz=5.5, gain=0.55),
    Timbre("horn", (1.0, 0.45, 0.2, 0.08, 0.03, 0.015), attack=0.06, decay=0.12, sustain=0.85,
           release=0.1, vibrato_cents=3, vibrato_hz=5.0, gain=0.85),
    Timbre("trombone", (1.0, 0.9, 0.6, 0.45, 0.3, 0.2, 0.12, 0.07), attack=0.05, decay=0.12,
           sustain=0.8, release=0.08, vibrato_cents=3, vibrato_hz=5.0, gain=0.7),
    Timbre("tuba", (1.0, 0.75, 0.55, 0.25, 0.12, 0.05), attack=0.06, decay=0.12, sustain=0.85,
           release=0.1, vibrato_cents=2, vibrato_hz=4.5, gain=1.0),
)}


@dataclass(frozen=True)
class SynthConfig:
    """Rendering parameters (all of them are part of the corpus cache key).

    tail_s: silence after the last note-off, where releases and the reverb ring out.
    reverb_s, rt60: impulse-response length and decay time; wet: reverb level against the dry mix.
    reverb_decimate: the reverb runs at ``sr / reverb_decimate``.
    table_size: wavetable length, a power of two.
    """

    sr: int = SR
    tail_s: float = 0.75
    reverb_s: float = 1.2
    rt60: float = 1.0
    reverb_decimate: int = 4
    wet: float = 0.22
    peak_dbfs: float = -1.0
    table_size: int = 4096
    max_harmonic: float = 0.45  # of sr: higher harmonics are dropped per note (no aliasing)
    tuning_hz: float = 440.0

    def __post_init__(self):
        if self.table_size < 64 or self.table_size & (self.table_size - 1):
            raise ValueError(f"table_size must be a power of two >= 64, got {self.table_size}")
        if int(self.reverb_decimate) != self.reverb_decimate or self.reverb_decimate < 1:
            raise ValueError(f"reverb_decimate must be a positive integer, got {self.reverb_decimate}")
        if self.sr <= 0 or self.tail_s < 0 or self.reverb_s <= 0 or self.rt60 <= 0 or self.wet < 0:
            raise ValueError("sr, reverb_s and rt60 must be > 0; tail_s and wet >= 0")
        if not 0 < self.max_harmonic <= 0.5:
            raise ValueError(f"max_harmonic is a fraction of sr in (0, 0.5], got {self.max_harmonic}")


def n_samples(duration_s: float, config: SynthConfig = SynthConfig()) -> int:
    """Length of a render whose last note ends at ``duration_s`` seconds."""
    return int(round((duration_s + config.tail_s) * config.sr))


def midi_hz(pitch, tuning_hz: float = 440.0):
    """Frequency of MIDI pitch(es) in equal temperament."""
    return tuning_hz * 2.0 ** ((np.asarray(pitch, dtype=np.float64) - 69.0) / 12.0)


def _uniform_noise(seed: int, n: int) -> np.ndarray:
    """``n`` stable uniform samples in [-1, 1) from the PCG64 bit stream (float64)."""
    raw = np.random.PCG64(seed).random_raw(n)
    return (raw >> np.uint64(11)).astype(np.float64) * (2.0 ** -52) - 1.0


def _wavetables(timbre: Timbre, size: int) -> np.ndarray:
    """``(K, size + 1)``: row ``k - 1`` holds one period with the first ``k`` harmonics. The
    tables share one scale (the full table peaks at 1) and the last column repeats the first."""
    amps = np.asarray(timbre.harmonics, dtype=np.float64)
    x = np.arange(size + 1, dtype=np.float64) * (2 * np.pi / size)
    partial = amps[:, None] * np.sin(np.arange(1, len(amps) + 1)[:, None] * x[None, :])
    tables = np.cumsum(partial, axis=0)
    return tables / np.abs(tables[-1]).max()


def _moving_sum(x: np.ndarray, width: int) -> np.ndarray:
    c = np.cumsum(np.concatenate([np.zeros(width), x]))
    return c[width:] - c[:-width]


class _NoteRenderer:
    """Renders single notes of one timbre, memoised by ``(pitch, held samples)``.

    Everything that does not depend on the pitch is computed once for the longest note: the
    vibrato-warped time ``warp`` (so the phase in cycles is ``f * warp``) and the attack/decay/
    sustain curve.
    """

    def __init__(self, timbre: Timbre, config: SynthConfig, noise: np.ndarray, max_len: int):
        self.t, self.c = timbre, config
        self.tables = _wavetables(timbre, config.table_size)
        self.noise = noise
        self.n_release = max(1, int(round(timbre.release * config.sr)))
        t = np.arange(max_len + self.n_release, dtype=np.float64) / config.sr
        # vibrato as phase modulation: d/dt of depth/(2 pi rate) * sin(2 pi rate t) swings by +-depth
        depth = 2.0 ** (timbre.vibrato_cents / 1200.0) - 1.0
        fade = np.clip((t - timbre.vibrato_delay) / 0.3, 0.0, 1.0)
        rate = 2 * np.pi * timbre.vibrato_hz
        self.warp = t + fade * (depth / rate) * np.sin(rate * t)
        self.top = 1.0 + depth  # highest instantaneous frequency / nominal frequency
        self.knots = [0.0, timbre.attack, timbre.attack + timbre.decay]
        self.levels = [0.0, 1.0, timbre.sustain]
        self.held = np.interp(t[:max_len], self.knots, self.levels)
        self.ramp = 1.0 - np.arange(1, self.n_release + 1, dtype=np.float64) / self.n_release
        self.memo: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, pitch: int, n_on: int) -> np.ndarray:
        key = (pitch, n_on)
        if key not in self.memo:
            self.memo[key] = self._render(pitch, n_on)
        return self.memo[key]

    def _render(self, pitch: int, n_on: int) -> np.ndarray:
        """float64 ``(n_on + release samples,)``: the note held for ``n_on`` samples, then released."""
        t_, c = self.t, self.c
        n = n_on + self.n_release
        f = float(midi_hz(pitch, c.tuning_hz))
        k = int(np.clip(np.floor(c.max_harmonic * c.sr / (f * self.top)), 1, len(t_.harmonics)))
        table = self.tables[k - 1]
        pos = self.warp[:n] * (f * c.table_size)  # phase in table samples
        i = pos.astype(np.int64)
        frac = pos - i
        i &= c.table_size - 1
        y = table[i]
        y += frac * (table[i + 1] - y)
        if t_.breath > 0:
            start = (pitch * 7919 + n_on * 104729) % (len(self.noise) - n)
            y += t_.breath * self.noise[start:start + n]
        # ADSR: attack/decay/sustain while held, then a linear release from the level reached
        off_level = float(np.interp(n_on / c.sr, self.knots, self.levels))
        env = np.concatenate([self.held[:n_on], off_level * self.ramp])
        env *= t_.gain
        y *= env
        return y


def _impulse_response(config: SynthConfig, seed: int) -> np.ndarray:
    """float64 ``(reverb_s * sr / reverb_decimate,)`` at the reduced rate: a unit-energy tail that
    decays by 60 dB in ``rt60`` and loses its highs as it decays, plus a few early reflections."""
    sr = config.sr / config.reverb_decimate
    n = int(round(config.reverb_s * sr))
    t = np.arange(n, dtype=np.float64) / sr
    noise = _uniform_noise(seed ^ 0x5EED, n)
    smooth = _moving_sum(noise, 3) / 3
    blend = np.clip(t / config.reverb_s, 0.0, 1.0)
    ir = ((1 - blend) * noise + blend * smooth) * np.exp(-6.9078 * t / config.rt60)
    ir[: int(0.008 * sr)] = 0.0  # pre-delay before the diffuse tail
    for ms, g in ((11.0, 0.5), (17.0, -0.4), (23.0, 0.32), (31.0, -0.25)):
        ir[int(ms * 1e-3 * sr)] += g * 3.0
    return ir / np.sqrt(np.sum(ir * ir))


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (FFT-friendly)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _reverb(dry: np.ndarray, ir: np.ndarray, wet: float, decimate: int) -> np.ndarray:
    """``dry + wet * (dry * ir)``, the convolution done at ``1/decimate`` of the rate (block means
    down, linear interpolation up): a reverb tail has little treble, and this keeps it cheap."""
    n = len(dry)
    m = -(-n // decimate)
    low = np.zeros(m * decimate)
    low[:n] = dry
    low = low.reshape(m, decimate).mean(axis=1)
    size = _fast_len(m + len(ir) - 1)
    tail = np.fft.irfft(np.fft.rfft(low, size) * np.fft.rfft(ir, size), size)[:m]
    centres = np.arange(m, dtype=np.float64) * decimate + (decimate - 1) / 2
    return dry + wet * np.interp(np.arange(n, dtype=np.float64), centres, tail)


def render_float(onset, duration, pitch, voice, timbres: Sequence[Timbre | str], *,
                 config: SynthConfig = SynthConfig(), seed: int = 0) -> np.ndarray:
    """Render notes to a float64 mono signal (reverb applied, not normalised).

    Args:
        onset, duration: ``(N,)`` seconds (onset >= 0, duration > 0).
        pitch: ``(N,)`` MIDI note numbers (integers).
        voice: ``(N,)`` index into ``timbres``.
        timbres: one ``Timbre`` (or name in ``TIMBRES``) per voice.
        seed: drives the breath noise and the reverb impulse response.
    Returns:
        ``(n_samples(max(onset + duration)),)`` float64.
    """
    onset, duration = np.asarray(onset, np.float64), np.asarray(duration, np.float64)
    pitch, voice = np.asarray(pitch), np.asarray(voice)
    if not (onset.ndim == 1 and onset.shape == duration.shape == pitch.shape == voice.shape):
        raise ValueError("onset, duration, pitch and voice must be 1-D arrays of one length")
    if onset.size == 0:
        raise ValueError("no notes to render")
    if not (np.all(np.isfinite(onset)) and np.all(np.isfinite(duration))) or onset.min() < 0 or duration.min() <= 0:
        raise ValueError("onsets must be finite and >= 0, durations finite and > 0")
    if not np.all(pitch == np.round(pitch)) or pitch.min() < 0 or pitch.max() > 127:
        raise ValueError(f"pitches must be integer MIDI numbers in [0, 127], got {pitch.min()}..{pitch.max()}")
    timbres = [TIMBRES[t] if isinstance(t, str) else t for t in timbres]
    if voice.min() < 0 or voice.max() >= len(timbres) or not np.all(voice == np.round(voice)):
        raise ValueError(f"voice indices must be integers in [0, {len(timbres)}), got {voice.min()}..{voice.max()}")
    sr = config.sr
    total = n_samples(float(np.max(onset + duration)), config)
    starts = np.round(onset * sr).astype(np.int64)
    lengths = np.maximum(1, np.round((onset + duration) * sr).astype(np.int64) - starts)
    max_release = max(int(round(t.release * sr)) for t in timbres)
    # breath noise: one stable buffer, band-passed (moving average minus a wider one)
    raw = _uniform_noise(seed, int(lengths.max()) + max_release + sr)
    noise = _moving_sum(raw, 3) / 3 - _moving_sum(raw, 24) / 24
    renderers = [_NoteRenderer(t, config, noise, int(lengths.max())) for t in timbres]
    out = np.zeros(total + max_release, dtype=np.float64)
    for s, n, p, v in zip(starts.tolist(), lengths.tolist(), pitch.astype(np.int64).tolist(),
                          voice.astype(np.int64).tolist()):
        note = renderers[v](p, n)
        out[s:s + len(note)] += note
    return _reverb(out[:total], _impulse_response(config, seed), config.wet, config.reverb_decimate)


def to_int16(signal: np.ndarray, peak_dbfs: float = -1.0) -> np.ndarray:
    """Peak-normalise a float signal to ``peak_dbfs`` and quantise to int16."""
    peak = float(np.max(np.abs(signal)))
    if not np.isfinite(peak) or peak == 0.0:
        raise ValueError("cannot normalise a silent or non-finite signal")
    scale = 32767.0 * 10.0 ** (peak_dbfs / 20.0) / peak
    return np.round(signal * scale).astype(np.int16)


def render(onset, duration, pitch, voice, timbres: Sequence[Timbre | str], *,
           config: SynthConfig = SynthConfig(), seed: int = 0) -> np.ndarray:
    """``render_float`` peak-normalised to ``config.peak_dbfs``: ``(n_samples,)`` int16."""
    return to_int16(render_float(onset, duration, pitch, voice, timbres, config=config, seed=seed),
                    config.peak_dbfs)
