"""Quality measures of the demo family: held-out NLL against a unigram baseline, and VQ-VAE
reconstruction distance against trivial baselines.

* ``load_eval_codes(model_dir)`` reads the ``eval_codes.npz`` a build ships beside the models
  (held-out codes + the train set's code counts);
* ``heldout_nll(prior, pieces)``: mean bits/token of a prior over consecutive whole windows of
  the held-out codes (labels and upper-level codes as in training);
* ``unigram_bits(counts, pieces, level)``: bits/token of the add-one smoothed train unigram on
  the same tokens;
* ``relative_stft_distance(target, pred)``: mean over the training STFT resolutions of
  ``||S(target) - S(pred)|| / ||S(target)||`` (0 = identical magnitudes; silence scores 1);
* ``tonal_fraction(audio)``: how much of the sound is pitched rather than noise (no reference
  needed, so it scores samples too);
* ``score_agreement(audio, text)``: how closely audio plays the notes of a score text (the
  pitch classes sounding per grid cell against the audio's pitch-class energy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["EvalPiece", "load_eval_codes", "heldout_nll", "unigram_bits", "relative_stft_distance",
           "lowpass", "tonal_fraction", "chroma_per_cell", "score_pitch_classes", "chroma_agreement",
           "score_agreement", "REQUIRED_MARGIN_BITS"]

# The held-out NLL of every demo prior must beat the train unigram by at least this many
# bits/token (asserted by tests/test_demo.py, stated in docs/demo_quality.md).
REQUIRED_MARGIN_BITS = 1.0


@dataclass
class EvalPiece:
    """Codes per level (level 0 first, int64 1-D) of the start of a held-out piece."""

    codes: list[np.ndarray]
    length: int          # the whole piece's length in samples (the timing label)
    artist: int
    genre: int


def load_eval_codes(path) -> tuple[list[EvalPiece], np.ndarray]:
    """``(pieces, unigram_counts (levels, l_bins))`` from ``eval_codes.npz`` or its directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "eval_codes.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no eval_codes.npz (written by `python -m fastjukebox.demo build`)")
    with np.load(path, allow_pickle=False) as f:
        counts = f["unigram_counts"].astype(np.int64)
        pieces = []
        for i in range(int(f["n_pieces"])):
            codes = [f[f"piece{i}_level{l}"].astype(np.int64) for l in range(counts.shape[0])]
            pieces.append(EvalPiece(codes, int(f[f"piece{i}_length"]), int(f[f"piece{i}_artist"]),
                                    int(f[f"piece{i}_genre"])))
    return pieces, counts


def _windows(prior, piece: EvalPiece, max_windows: int | None):
    """Consecutive whole windows: (tokens (W, n_ctx), upper (W, n_ctx/down) or None, starts)."""
    c = prior.config
    z = piece.codes[c.level]
    n = len(z) // c.n_ctx
    if max_windows is not None:
        n = min(n, max_windows)
    starts = [i * c.n_ctx for i in range(n)]
    toks = np.stack([z[s:s + c.n_ctx] for s in starts]) if n else np.zeros((0, c.n_ctx), np.int64)
    up = None
    if c.cond_downsample is not None and n:
        d, u = c.cond_downsample, piece.codes[c.level + 1]
        up = np.stack([u[s // d:(s + c.n_ctx) // d] for s in starts])
    return toks, up, starts


@torch.no_grad()
def heldout_nll(prior, pieces: list[EvalPiece], max_windows: int | None = None, batch_size: int = 8) -> dict:
    """Mean bits/token of ``prior`` over consecutive windows of ``pieces`` (at most
    ``max_windows`` per piece). Returns ``{"bits": float, "tokens": int, "windows": int}``."""
    from ..labels import Labeller, Labels
    c = prior.config
    labeller = Labeller(c.max_bow_genre_size, c.n_tokens, c.sample_length, "v3" if c.labels_v3 else "v2") \
        if c.labels else None
    hop = c.raw_to_tokens
    total_bits, total_tokens, windows = 0.0, 0, 0
    for piece in pieces:
        toks, up, starts = _windows(prior, piece, max_windows)
        for b in range(0, len(starts), batch_size):
            t = torch.from_numpy(toks[b:b + batch_size])
            u = None if up is None else torch.from_numpy(up[b:b + batch_size])
            y = None
            if labeller is not None:
                y = Labels.stack([labeller.label(piece.artist, piece.genre, "", piece.length, s * hop)
                                  for s in starts[b:b + batch_size]]).y
            bits = float(prior.loss(t, u, y)["gen_loss"])
            total_bits += bits * t.numel()
            total_tokens += t.numel()
            windows += t.shape[0]
    if not total_tokens:
        raise ValueError(f"no whole window of {c.n_ctx} level-{c.level} codes in the evaluation pieces")
    return {"bits": total_bits / total_tokens, "tokens": total_tokens, "windows": windows}


def unigram_bits(counts: np.ndarray, pieces: list[EvalPiece], level: int, n_ctx: int,
                 max_windows: int | None = None) -> float:
    """Bits/token of the add-one smoothed unigram ``counts[level]`` on the tokens
    ``heldout_nll`` scores (whole ``n_ctx`` windows, at most ``max_windows`` per piece)."""
    p = (counts[level] + 1.0) / (counts[level].sum() + counts.shape[1])
    nll = -np.log2(p)
    bits, n = 0.0, 0
    for piece in pieces:
        w = len(piece.codes[level]) // n_ctx
        if max_windows is not None:
            w = min(w, max_windows)
        z = piece.codes[level][: w * n_ctx]
        bits += float(nll[z].sum())
        n += len(z)
    if not n:
        raise ValueError(f"no whole window of {n_ctx} level-{level} codes in the evaluation pieces")
    return bits / n


def relative_stft_distance(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """(N,) mean over resolutions of ``||S(target) - S(pred)|| / ||S(target)||``; (N, T) inputs."""
    from ..train.losses import MULTI_STFT, stft_magnitude
    out = []
    for spec in MULTI_STFT:
        st, sp = stft_magnitude(target, spec), stft_magnitude(pred, spec)
        num = (st - sp).reshape(st.shape[0], -1).norm(dim=-1)
        den = st.reshape(st.shape[0], -1).norm(dim=-1).clamp(min=1e-8)
        out.append(num / den)
    return torch.stack(out).mean(0)


def lowpass(audio: torch.Tensor, cutoff_hz: float, sr: int = 44100) -> torch.Tensor:
    """(N, T) audio with every frequency above ``cutoff_hz`` removed (FFT brick wall)."""
    spec = torch.fft.rfft(audio.double(), dim=-1)
    freqs = torch.fft.rfftfreq(audio.shape[-1], 1.0 / sr)
    spec[..., freqs > cutoff_hz] = 0
    return torch.fft.irfft(spec, n=audio.shape[-1], dim=-1).to(audio.dtype)


def tonal_fraction(audio, sr: int = 44100, fmax_hz: float = 4000.0, n_fft: int = 4096, hop: int = 1024,
                   prominence_db: float = 10.0, half_width: int = 12) -> float:
    """Share of the spectral energy below ``fmax_hz`` that lies in spectral peaks: bins at least
    ``prominence_db`` above the median of the ``2 * half_width + 1`` bins around them (10.8 Hz bins).

    Sustained notes put their energy in narrow harmonic lines far above their neighbourhood;
    noise spreads it evenly. Averaged over frames that are not near-silent (> -40 dB of the
    loudest). A rendered chorale scores about 0.98, white noise about 0.02. ``audio``: (T,) or
    (1, T), at least ``n_fft`` samples."""
    a = torch.as_tensor(np.asarray(audio, dtype=np.float32)).reshape(-1)
    if a.numel() < n_fft:
        raise ValueError(f"tonal_fraction needs at least {n_fft} samples, got {a.numel()}")
    spec = torch.stft(a, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs().pow(2)
    spec = spec[: int(fmax_hz / sr * n_fft)]                                   # (bins, frames)
    energy = spec.sum(0)
    spec = spec[:, energy > 1e-4 * energy.max().clamp(min=1e-30)]
    if spec.shape[1] == 0:
        return 0.0
    padded = torch.nn.functional.pad(spec.T[None], (half_width, half_width), mode="replicate")[0]
    local = padded.unfold(1, 2 * half_width + 1, 1).median(-1).values.T        # (bins, frames)
    peaks = spec > local * 10 ** (prominence_db / 10)
    return float(((spec * peaks).sum(0) / spec.sum(0).clamp(min=1e-30)).mean())


def margin_ok(nll_bits: float, unigram: float, margin: float = REQUIRED_MARGIN_BITS) -> bool:
    return math.isfinite(nll_bits) and nll_bits <= unigram - margin


def chroma_per_cell(audio, cell_seconds: float, sr: int = 44100, fmin_hz: float = 60.0,
                    fmax_hz: float = 2000.0) -> np.ndarray:
    """``(cells, 12)`` pitch-class energy of consecutive ``cell_seconds`` stretches of ``audio``
    (Hann-windowed spectrum of each stretch, bins between ``fmin_hz`` and ``fmax_hz`` folded onto
    the nearest equal-tempered pitch class, C = 0); each row sums to 1 (0 for silence)."""
    a = np.asarray(audio, dtype=np.float64).reshape(-1)
    n = int(round(cell_seconds * sr))
    cells = len(a) // n
    if cells == 0:
        raise ValueError(f"audio of {len(a)} samples is shorter than one cell of {n}")
    frames = a[: cells * n].reshape(cells, n) * np.hanning(n)
    n_fft = 1 << max(n - 1, 1).bit_length()
    power = np.abs(np.fft.rfft(frames, n_fft, axis=-1)) ** 2
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    keep = (freqs >= fmin_hz) & (freqs <= fmax_hz)
    pc = np.rint(12 * np.log2(freqs[keep] / 440.0) + 69).astype(np.int64) % 12
    out = power[:, keep] @ np.eye(12)[pc]                                     # (cells, 12)
    total = out.sum(-1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 1e-12 * max(total.max(), 1e-30))


def score_pitch_classes(text: str) -> np.ndarray:
    """``(cells, 12)`` pitch classes a score text (``fastjukebox.demo.score_text``) sounds per
    cell, each sounding voice counting once."""
    from .score_text import pitches_of_text
    pitches = pitches_of_text(text)
    out = np.zeros((len(pitches), 12))
    for voice in range(pitches.shape[1]):
        p = pitches[:, voice]
        out[np.nonzero(p >= 0)[0], p[p >= 0] % 12] += 1.0
    return out


def chroma_agreement(chroma: np.ndarray, score: np.ndarray) -> float:
    """The mean over the cells with notes in ``score`` (``score_pitch_classes``) and sound in
    ``chroma`` (``chroma_per_cell``) of the cosine between the two; both read from their start."""
    n = min(len(chroma), len(score))
    a, s = chroma[:n], score[:n]
    use = (s.sum(-1) > 0) & (a.sum(-1) > 0)
    if not use.any():
        raise ValueError("no cell has both notes in the text and sound in the audio")
    a, s = a[use], s[use]
    return float(((a * s).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(s, axis=-1))).mean())


def score_agreement(audio, text: str, sr: int = 44100) -> float:
    """How well ``audio`` plays the notes of a score text (``fastjukebox.demo.score_text``): the
    mean over cells with notes and sound of the cosine between the audio's pitch-class energy
    and the score's pitch classes (each sounding voice counts once). The text is read from its
    start, one cell per ``GRID_SECONDS`` of audio. Overtones keep even the rendered score itself
    below 1; compare with the same audio against another piece's text for the chance level.
    (Comparing many clips with many texts: ``chroma_agreement`` on chromas and pitch classes
    computed once each.)"""
    from .score_text import GRID_SECONDS
    score = score_pitch_classes(text)
    return chroma_agreement(chroma_per_cell(audio, GRID_SECONDS, sr), score)
