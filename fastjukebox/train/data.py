"""Training data: random fixed-length windows of audio pieces, or of their codes.

Both datasets are pure functions of ``(seed, step)``: ``batch(step, batch_size)`` draws the same
windows whatever happened before, so a resumed run sees exactly the batches an uninterrupted run
would have seen, and no data-loader state needs checkpointing.

A *piece* is one recording (a song). Its labels (:class:`PieceLabels`: artist id, genre ids,
lyrics, total length) are shared by every window cut from it; the window's offset comes with the
batch so that label rows ``[total_length, offset, sample_length, ...]`` can be built per window.

Code pieces are stored as ``.npz`` files with arrays ``level_0 .. level_{L-1}`` (int codes of one
piece), ``length`` (audio samples) and optionally ``artist``, ``genre`` and ``lyrics``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..progress import track

__all__ = ["PieceLabels", "AudioBatch", "CodeBatch", "AudioWindows", "CodeWindows", "as_float_audio",
           "step_rng", "read_piece_labels", "save_code_piece", "load_code_piece", "encode_pieces"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3", ".opus")


@dataclass
class PieceLabels:
    """Labels of one piece. ``total_length`` (samples) defaults to the piece's own length."""

    artist: int = 0
    genre: int | list[int] = 0
    lyrics: str = ""
    total_length: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "PieceLabels":
        if d is None:
            return cls()
        unknown = sorted(set(d) - {"artist", "genre", "lyrics", "total_length"})
        if unknown:
            raise ValueError(f"unknown piece label field(s): {', '.join(unknown)} "
                             f"(known: artist, genre, lyrics, total_length)")
        genre = d.get("genre", 0)
        genre = [int(g) for g in genre] if isinstance(genre, (list, tuple)) else int(genre)
        total = d.get("total_length")
        return cls(int(d.get("artist", 0)), genre, str(d.get("lyrics", "") or ""),
                   None if total is None else int(total))


@dataclass
class AudioBatch:
    """audio: (B, window) float32 in [-1, 1]; piece, offset: (B,) int64 (offset in samples)."""

    audio: torch.Tensor
    piece: torch.Tensor
    offset: torch.Tensor


@dataclass
class CodeBatch:
    """tokens: (B, n_ctx) int64 codes of the level; upper: (B, n_ctx // down) codes of the level
    above or None; piece, offset (samples), total_length (samples): (B,) int64."""

    tokens: torch.Tensor
    upper: torch.Tensor | None
    piece: torch.Tensor
    offset: torch.Tensor
    total_length: torch.Tensor


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """A generator that depends only on ``(seed, step, stream)``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), int(stream)])


def as_float_audio(x: Any, name: str = "audio") -> np.ndarray:
    """One piece as float32 mono (T,) in [-1, 1].

    Accepts int16 (scaled by 1/32768), int32 (1/2**31) or float arrays, 1-D or (T, channels)
    (down-mixed to the mean).
    """
    a = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if a.ndim == 2:
        a = a.mean(axis=1, dtype=np.float64) if np.issubdtype(a.dtype, np.floating) else a.mean(axis=1)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (T,) or (T, channels); got shape {tuple(np.shape(x))}")
    if a.dtype == np.int16:
        a = a.astype(np.float32) / 32768.0
    elif a.dtype == np.int32:
        a = a.astype(np.float32) / 2.0 ** 31
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
    else:
        raise ValueError(f"{name} must be int16, int32 or floating point; got {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite samples")
    return np.clip(a, -1.0, 1.0)


def _labels_list(labels, n: int) -> list[PieceLabels]:
    if labels is None:
        return [PieceLabels() for _ in range(n)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} label entries for {n} pieces")
    return [l if isinstance(l, PieceLabels) else PieceLabels.from_dict(l) for l in labels]


class AudioWindows:
    """Random ``window``-sample windows of audio pieces.

    A piece is chosen with probability proportional to its number of window starts and the start
    uniformly; pieces shorter than the window are zero-padded at the end (offset 0).
    """

    def __init__(self, pieces: Sequence[Any], window: int, labels: Sequence[Any] | None = None,
                 seed: int = 0):
        if window <= 0:
            raise ValueError(f"window must be a positive number of samples, got {window}")
        if not len(pieces):
            raise ValueError("no audio pieces given")
        self.pieces = [as_float_audio(p, f"audio piece {i}") for i, p in enumerate(pieces)]
        self.labels = _labels_list(labels, len(self.pieces))
        self.window, self.seed = int(window), int(seed)
        starts = np.array([max(len(p) - self.window, 0) + 1 for p in self.pieces], dtype=np.float64)
        self._p = starts / starts.sum()

    def __len__(self) -> int:
        return len(self.pieces)

    def total_length(self, i: int) -> int:
        t = self.labels[i].total_length
        return len(self.pieces[i]) if t is None else t

    def batch(self, step: int, batch_size: int, stream: int = 0) -> AudioBatch:
        rng = step_rng(self.seed, step, stream)
        idx = rng.choice(len(self.pieces), size=batch_size, p=self._p)
        out = np.zeros((batch_size, self.window), dtype=np.float32)
        offsets = np.zeros(batch_size, dtype=np.int64)
        for b, i in enumerate(idx):
            p = self.pieces[i]
            start = int(rng.integers(0, max(len(p) - self.window, 0) + 1))
            seg = p[start:start + self.window]
            out[b, :len(seg)] = seg
            offsets[b] = start
        return AudioBatch(torch.from_numpy(out), torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(offsets))


class CodeWindows:
    """Random windows of ``n_ctx`` codes of one level, with the matching codes of the level above.

    pieces: per piece, a sequence of code arrays per level (level 0 first; unused levels may be
        None). ``hop_lengths``: audio samples per code at each level. ``upper_down``: codes of
        ``level`` per code of ``level + 1`` (None: no upper codes, the top prior). Window starts
        are multiples of ``upper_down`` so the upper window lines up exactly.
    length_range: ``(lo, hi)`` in samples; pieces whose total length is outside ``[lo, hi)``
        are left out (the top prior's timing embedding only covers that range).
    """

    def __init__(self, pieces: Sequence[Sequence[Any]], level: int, n_ctx: int, hop_lengths: Sequence[int],
                 upper_down: int | None = None, labels: Sequence[Any] | None = None,
                 lengths: Sequence[int] | None = None, length_range: tuple[float, float] | None = None,
                 seed: int = 0):
        if not len(pieces):
            raise ValueError("no code pieces given")
        labels = _labels_list(labels, len(pieces))
        self.level, self.n_ctx, self.seed = int(level), int(n_ctx), int(seed)
        self.hop = int(hop_lengths[level])
        self.down = None if upper_down is None else int(upper_down)
        if self.down is not None and self.n_ctx % self.down:
            raise ValueError(f"n_ctx={n_ctx} is not a multiple of the upper-level down-sampling {self.down}")
        self.tokens, self.upper, self.labels, self.totals, skipped = [], [], [], [], []
        for i, codes in enumerate(pieces):
            z = self._codes(codes, level, i)
            up = self._codes(codes, level + 1, i) if self.down is not None else None
            if up is not None and len(up) * self.down < len(z) - self.down + 1:
                raise ValueError(f"piece {i}: {len(up)} level-{level + 1} codes do not cover its "
                                 f"{len(z)} level-{level} codes")
            total = labels[i].total_length
            if total is None:
                total = int(lengths[i]) if lengths is not None else len(z) * self.hop
            if len(z) < self.n_ctx or (length_range and not length_range[0] <= total < length_range[1]):
                skipped.append(i)
                continue
            self.tokens.append(z)
            self.upper.append(up)
            self.labels.append(labels[i])
            self.totals.append(int(total))
        self.skipped = skipped
        if not self.tokens:
            why = f"at least {self.n_ctx} level-{level} codes ({self.n_ctx * self.hop} samples)"
            if length_range:
                why += f" and a total length in [{length_range[0]:.0f}, {length_range[1]:.0f}) samples"
            raise ValueError(f"none of the {len(pieces)} pieces is usable: a piece needs {why}")
        step = self.down or 1
        counts = np.array([(len(z) - self.n_ctx) // step + 1 for z in self.tokens], dtype=np.float64)
        self._p = counts / counts.sum()

    @staticmethod
    def _codes(codes, level: int, i: int) -> np.ndarray:
        if level >= len(codes) or codes[level] is None:
            raise ValueError(f"piece {i} has no level-{level} codes")
        z = codes[level]
        z = z.detach().cpu().numpy() if torch.is_tensor(z) else np.asarray(z)
        if z.ndim == 2 and z.shape[0] == 1:
            z = z[0]
        if z.ndim != 1 or not np.issubdtype(z.dtype, np.integer):
            raise ValueError(f"piece {i}: level-{level} codes must be a 1-D integer array, got "
                             f"{z.dtype} shape {z.shape}")
        return z.astype(np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, step: int, batch_size: int, stream: int = 0) -> CodeBatch:
        rng = step_rng(self.seed, step, stream)
        idx = rng.choice(len(self.tokens), size=batch_size, p=self._p)
        step_t = self.down or 1
        toks = np.empty((batch_size, self.n_ctx), dtype=np.int64)
        ups = None if self.down is None else np.empty((batch_size, self.n_ctx // self.down), dtype=np.int64)
        offsets = np.empty(batch_size, dtype=np.int64)
        for b, i in enumerate(idx):
            z = self.tokens[i]
            start = int(rng.integers(0, (len(z) - self.n_ctx) // step_t + 1)) * step_t
            toks[b] = z[start:start + self.n_ctx]
            if ups is not None:
                u = self.upper[i][start // self.down: (start + self.n_ctx) // self.down]
                ups[b, :len(u)] = u
                ups[b, len(u):] = u[-1] if len(u) else 0  # a ragged tail: repeat the last code
            offsets[b] = start * self.hop
        totals = np.array([self.totals[i] for i in idx], dtype=np.int64)
        return CodeBatch(torch.from_numpy(toks), None if ups is None else torch.from_numpy(ups),
                         torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(offsets), torch.from_numpy(totals))


# --- files -----------------------------------------------------------------------------------

def read_piece_labels(directory: str | os.PathLike) -> dict[str, PieceLabels]:
    """``labels.json`` of a data directory: ``{file name: {artist, genre, lyrics, total_length}}``."""
    f = Path(directory) / "labels.json"
    if not f.exists():
        return {}
    try:
        with open(f, encoding="utf-8") as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{f}: expected an object mapping file names to labels")
    return {name: PieceLabels.from_dict(v) for name, v in d.items()}


def save_code_piece(path: str | os.PathLike, codes: Sequence[Any], length: int,
                    labels: PieceLabels | None = None) -> Path:
    """Write one piece's codes (per level, level 0 first) and labels as ``.npz``, atomically."""
    from ..atomic import atomic_path
    path = Path(path)
    arrays = {f"level_{l}": np.asarray(z.cpu() if torch.is_tensor(z) else z, dtype=np.int64).reshape(-1)
              for l, z in enumerate(codes) if z is not None}
    arrays["length"] = np.array(int(length))
    if labels is not None:
        arrays["artist"] = np.array(labels.artist)
        arrays["genre"] = np.array(labels.genre, dtype=np.int64).reshape(-1)
        arrays["lyrics"] = np.array(labels.lyrics)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path


def load_code_piece(path: str | os.PathLike) -> tuple[list[np.ndarray | None], int, PieceLabels]:
    """Inverse of :func:`save_code_piece`: (codes per level, length in samples, labels)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            levels = sorted(int(k[len("level_"):]) for k in f.files if k.startswith("level_"))
            if not levels:
                raise ValueError(f"{path}: no level_<n> arrays")
            codes: list[np.ndarray | None] = [None] * (levels[-1] + 1)
            for l in levels:
                codes[l] = f[f"level_{l}"]
            length = int(f["length"]) if "length" in f.files else None
            genre = f["genre"].tolist() if "genre" in f.files else 0
            labels = PieceLabels(int(f["artist"]) if "artist" in f.files else 0,
                                 genre[0] if isinstance(genre, list) and len(genre) == 1 else genre,
                                 str(f["lyrics"]) if "lyrics" in f.files else "")
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable code file ({e})") from None
    return codes, length, labels


@torch.no_grad()
def encode_pieces(vqvae, pieces: Sequence[Any], chunk: int = 44100 * 8, progress: bool = False
                  ) -> list[list[np.ndarray]]:
    """Codes per level of every piece, encoded in chunks of ``chunk`` samples (a multiple of
    the top hop length) so long recordings fit in memory. Tails shorter than one top-level code
    are dropped."""
    hop = vqvae.hop_lengths[-1]
    chunk = max(chunk // hop, 1) * hop
    out = []
    for i, p in enumerate(track(pieces, "encode", "piece", enabled=progress)):
        a = torch.from_numpy(as_float_audio(p, f"audio piece {i}"))
        n = len(a) // hop * hop
        if n == 0:
            raise ValueError(f"audio piece {i} is shorter than one top-level code ({hop} samples)")
        parts = [vqvae.encode(a[s:min(s + chunk, n)][None]) for s in range(0, n, chunk)]
        out.append([torch.cat([c[l] for c in parts], dim=1)[0].cpu().numpy() for l in range(len(parts[0]))])
    return out
