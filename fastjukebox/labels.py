"""Conditioning labels: artist/genre ids, lyric windows and the per-window label vector.

A label row is ``y = [total_length, offset, sample_length, artist_id, genre_1..genre_G,
lyric_1..lyric_n]`` (int64, lengths in audio samples; unused genre slots are -1). For every window
of the sampler the row is adjusted (:func:`window_labels`): the window's length in samples, its
offset, and the lyric tokens re-selected around the window's midpoint.

Artist and genre names resolve through the original id files (:class:`LabelIds`); numeric ids
can always be given directly.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .text import TextProcessor, normalise_version

__all__ = ["UnknownLabelError", "LabelIds", "Labels", "Labeller", "normalise_v2_name",
           "relevant_lyric_tokens", "window_labels", "get_starts"]

_NOT_ALNUM = re.compile(r"[^a-z0-9]+")


def normalise_v2_name(name: str) -> str:
    """v2 key of a name: lowercased, each run of chars outside [a-z0-9] -> '_', stripped."""
    return _NOT_ALNUM.sub("_", name.lower()).strip("_")


class UnknownLabelError(ValueError):
    """An artist or genre name that is not in the id file."""

    def __init__(self, kind: str, name: str, key: str, path: str, known: Iterable[str],
                 missing: str | None = None):
        """``key``: the normalised name; ``missing``: the absent word of a v2 genre bag."""
        self.kind, self.name, self.key, self.path = kind, name, key, path
        self.missing = missing or key
        self.suggestions = difflib.get_close_matches(self.missing, list(known), n=5)
        what = "" if missing is None else f": the word {missing!r}"
        hint = (f"close matches: {', '.join(map(repr, self.suggestions))}" if self.suggestions
                else "no close matches")
        super().__init__(f"{kind} {name!r} (normalised: {key!r}){what} is not in {path} "
                         f"({hint}); numeric ids can be passed instead of names")


def _read_id_file(path: str) -> dict[str, int]:
    ids: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            name, sep, idx = line.rpartition(";")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected 'name;id', got {line!r}")
            ids[name.lower()] = int(idx)
    return ids


def _reverse(ids: Mapping[str, int]) -> dict[int, str]:
    """id -> name; several names sharing an id are joined with '_' in sorted order."""
    names: dict[int, list[str]] = {}
    for name, i in ids.items():
        names.setdefault(i, []).append(name)
    return {i: "_".join(sorted(n)) for i, n in names.items()}


class LabelIds:
    """Artist and genre name <-> id tables of one label version.

    v2: names are normalised with :func:`normalise_v2_name` and a genre is a bag of words (one id
    per ``_``-separated word). v3: names are only lowercased and a genre is a single entry.
    """

    def __init__(self, artists: Mapping[str, int], genres: Mapping[str, int], version: str | int,
                 artist_file: str = "<artist ids>", genre_file: str = "<genre ids>"):
        self.version = normalise_version(version)
        self.artists = {k.lower(): int(v) for k, v in artists.items()}
        self.genres = {k.lower(): int(v) for k, v in genres.items()}
        self.artist_file, self.genre_file = str(artist_file), str(genre_file)
        self._artist_names = _reverse(self.artists)
        self._genre_names = _reverse(self.genres)

    @classmethod
    def from_files(cls, artist_file: str | os.PathLike, genre_file: str | os.PathLike,
                   version: str | int) -> "LabelIds":
        """Read the original ``name;id`` files (utf-8, one entry per line)."""
        return cls(_read_id_file(os.fspath(artist_file)), _read_id_file(os.fspath(genre_file)),
                   version, os.fspath(artist_file), os.fspath(genre_file))

    @classmethod
    def from_dir(cls, ids_dir: str | os.PathLike, version: str | int) -> "LabelIds":
        """Read ``{version}_artist_ids.txt`` and ``{version}_genre_ids.txt`` from ``ids_dir``."""
        v = normalise_version(version)
        return cls.from_files(os.path.join(ids_dir, f"{v}_artist_ids.txt"),
                              os.path.join(ids_dir, f"{v}_genre_ids.txt"), v)

    def artist_key(self, name: str) -> str:
        return name.lower() if self.version == "v3" else normalise_v2_name(name)

    def genre_keys(self, name: str) -> list[str]:
        return [name.lower()] if self.version == "v3" else normalise_v2_name(name).split("_")

    def artist_id(self, name: str) -> int:
        key = self.artist_key(name)
        if key not in self.artists:
            raise UnknownLabelError("artist", name, key, self.artist_file, self.artists)
        return self.artists[key]

    def genre_ids(self, name: str) -> list[int]:
        keys = self.genre_keys(name)
        for key in keys:
            if key not in self.genres:
                raise UnknownLabelError("genre", name, "_".join(keys), self.genre_file,
                                        self.genres, key if len(keys) > 1 else None)
        return [self.genres[k] for k in keys]

    def artist_name(self, artist_id: int) -> str:
        """Name(s) stored for ``artist_id`` (KeyError if absent)."""
        return self._artist_names[int(artist_id)]

    def genre_name(self, genre_ids: Iterable[int]) -> str:
        """Genre names of the non-negative ids, joined with '_' (KeyError if absent)."""
        return "_".join(self._genre_names[int(i)] for i in genre_ids if int(i) >= 0)


def _lyric_midpoint(n: int, total_length: int, offset: int, duration: int, float32: bool) -> int:
    if not float32:
        return int(n * (offset + duration / 2.0) / total_length)
    # Per window the reference evaluates this on 0-d tensors cut from the int64 label row; the
    # division by 2.0 promotes to float32 and every later step stays in float32.
    f32 = torch.float32
    mid = torch.tensor(offset).to(f32) + torch.tensor(duration).to(f32) / 2.0
    return int(n * mid / torch.tensor(total_length).to(f32))


def relevant_lyric_tokens(full_tokens: Sequence[int], n_tokens: int, total_length: int,
                          offset: int, duration: int, float32: bool = False
                          ) -> tuple[list[int], list[int]]:
    """The ``n_tokens`` lyric tokens for a window and each one's index in ``full_tokens``.

    Short text is left-padded with token 0 (index -1). Otherwise the window is centred on
    ``int(len * (offset + duration / 2) / total_length)``, clamped so it stays inside the text.
    ``float32=True`` evaluates that midpoint in float32 as the per-window re-selection does;
    ``False`` uses Python floats as the initial label does.
    """
    total_length, offset, duration = int(total_length), int(offset), int(duration)
    if not 0 <= offset < total_length:
        raise ValueError(f"offset {offset} is outside [0, total_length={total_length})")
    n = len(full_tokens)
    if n < n_tokens:
        pad = n_tokens - n
        return [0] * pad + [int(t) for t in full_tokens], [-1] * pad + list(range(n))
    if n_tokens % 2:
        raise ValueError(f"n_tokens must be even to centre a lyric window, got {n_tokens}")
    half = n_tokens // 2
    mid = min(max(_lyric_midpoint(n, total_length, offset, duration, float32), half), n - half)
    indices = list(range(mid - half, mid + half))
    return [int(full_tokens[i]) for i in indices], indices


@dataclass
class Labels:
    """A batch of label rows and what per-window re-selection needs.

    ``y``: LongTensor (N, 4 + G + n_tokens); ``full_tokens``: per row, the whole tokenised lyrics;
    ``info``: per row, optional descriptive dicts (artist, genre, cleaned lyrics).
    """

    y: torch.Tensor
    full_tokens: list[list[int]]
    n_tokens: int = 0
    info: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.y = torch.as_tensor(self.y, dtype=torch.int64)
        if self.y.dim() == 1:
            self.y = self.y.unsqueeze(0)
        if self.y.dim() != 2 or self.y.shape[1] < 4 + self.n_tokens:
            raise ValueError(f"label y must be (N, 4 + G + {self.n_tokens}), "
                             f"got {tuple(self.y.shape)}")
        self.full_tokens = [list(map(int, t)) for t in self.full_tokens]
        if len(self.full_tokens) != self.y.shape[0]:
            raise ValueError(f"{len(self.full_tokens)} full_tokens lists for "
                             f"{self.y.shape[0]} rows")
        if self.info and len(self.info) != self.y.shape[0]:
            raise ValueError(f"{len(self.info)} info entries for {self.y.shape[0]} rows")

    @classmethod
    def from_y(cls, y: Any, n_tokens: int = 0,
               full_tokens: Sequence[Sequence[int]] | None = None) -> "Labels":
        """Wrap ready-made rows; ``full_tokens`` is required when ``n_tokens > 0``."""
        y = torch.as_tensor(y, dtype=torch.int64)
        rows = 1 if y.dim() == 1 else y.shape[0]
        if full_tokens is None:
            if n_tokens > 0:
                raise ValueError("full_tokens (the whole tokenised lyrics per row) are needed "
                                 "to re-select lyric windows")
            full_tokens = [[] for _ in range(rows)]
        return cls(y, [list(t) for t in full_tokens], n_tokens)

    @staticmethod
    def stack(items: Sequence["Labels"]) -> "Labels":
        """Concatenate batches row-wise (same width and n_tokens)."""
        if not items:
            raise ValueError("Labels.stack needs at least one Labels")
        first = items[0]
        for it in items[1:]:
            if it.n_tokens != first.n_tokens or it.y.shape[1] != first.y.shape[1]:
                raise ValueError("cannot stack labels of different layouts: "
                                 f"{tuple(first.y.shape)}/{first.n_tokens} vs "
                                 f"{tuple(it.y.shape)}/{it.n_tokens}")
        info = [d for it in items for d in it.info] if all(it.info for it in items) else []
        return Labels(torch.cat([it.y.to(first.y.device) for it in items]),
                      [t for it in items for t in it.full_tokens], first.n_tokens, info)

    def to(self, device: torch.device | str) -> "Labels":
        return Labels(self.y.to(device), self.full_tokens, self.n_tokens, self.info)

    def __len__(self) -> int:
        return self.y.shape[0]

    @property
    def max_genre_words(self) -> int:
        return self.y.shape[1] - 4 - self.n_tokens


class Labeller:
    """Builds label rows for a prior with ``max_genre_words`` genre slots and ``n_tokens`` lyrics.

    ``sample_length`` is the prior's window length in audio samples (n_ctx * raw_to_tokens).
    """

    def __init__(self, max_genre_words: int, n_tokens: int, sample_length: int,
                 version: str | int = "v2", ids: LabelIds | None = None):
        self.max_genre_words, self.n_tokens = int(max_genre_words), int(n_tokens)
        self.sample_length = int(sample_length)
        self.version = normalise_version(version)
        self.text = TextProcessor(self.version)
        self.ids = ids

    @property
    def width(self) -> int:
        """Length of one label row, 4 + G + n_tokens."""
        return 4 + self.max_genre_words + self.n_tokens

    def _id_table(self, what: str, name: str, ids: LabelIds | None) -> LabelIds:
        ids = ids if ids is not None else self.ids
        if ids is None:
            raise ValueError(f"{what} {name!r} is a name, and names need the {self.version} artist/"
                             f"genre id files (LabelIds.from_files); numeric ids always work")
        if ids.version != self.version:
            raise ValueError(f"id tables are {ids.version} but this labeller is {self.version}")
        return ids

    def _artist(self, artist: str | int, ids: LabelIds | None) -> int:
        if isinstance(artist, str):
            return self._id_table("artist", artist, ids).artist_id(artist)
        artist_id = int(artist)
        if artist_id < 0:
            raise ValueError(f"artist id must be >= 0, got {artist_id}")
        return artist_id

    def _genres(self, genre: str | int | Sequence[int], ids: LabelIds | None) -> list[int]:
        if hasattr(genre, "tolist"):  # tensors and numpy values
            genre = genre.tolist()
        if isinstance(genre, str):
            genre_ids = self._id_table("genre", genre, ids).genre_ids(genre)
        elif isinstance(genre, Iterable):
            genre_ids = [int(g) for g in genre]
        else:
            genre_ids = [int(genre)]
        if any(g < 0 for g in genre_ids):
            raise ValueError(f"genre ids must be >= 0 (padding is added), got {genre_ids}")
        if len(genre_ids) > self.max_genre_words:
            raise ValueError(f"genre {genre!r} gives {len(genre_ids)} ids {genre_ids}, but this "
                             f"prior takes at most {self.max_genre_words} (max_genre_words)")
        return genre_ids + [-1] * (self.max_genre_words - len(genre_ids))

    def label(self, artist: str | int, genre: str | int | Sequence[int], lyrics: str | None,
              total_length: int, offset: int, ids: LabelIds | None = None) -> Labels:
        """One label row (batch of 1). Names resolve through ``ids`` (or the labeller's own)."""
        text = self.text.clean(lyrics or "")
        full_tokens = self.text.tokenise(text)
        tokens, _ = relevant_lyric_tokens(full_tokens, self.n_tokens, total_length, offset,
                                          self.sample_length, float32=False)
        row = [int(total_length), int(offset), self.sample_length, self._artist(artist, ids),
               *self._genres(genre, ids), *tokens]
        info = dict(artist=artist, genre=genre, lyrics=text)
        return Labels(torch.tensor([row], dtype=torch.int64), [full_tokens], self.n_tokens, [info])

    def label_batch(self, metas: Sequence[Mapping[str, Any]],
                    ids: LabelIds | None = None) -> Labels:
        """Stack :meth:`label` over dicts with keys artist, genre, lyrics, total_length, offset."""
        return Labels.stack([self.label(**dict(m), ids=ids) for m in metas])

    def describe(self, y_row: Sequence[int] | torch.Tensor, ids: LabelIds | None = None) -> dict:
        """Human-readable fields of one row; ids are kept as numbers when no table names them."""
        row = [int(v) for v in (y_row.tolist() if torch.is_tensor(y_row) else y_row)]
        if len(row) != self.width:
            raise ValueError(f"expected a row of length {self.width}, got {len(row)}")
        ids = ids if ids is not None else self.ids
        genres = row[4:4 + self.max_genre_words]
        artist: Any = row[3]
        genre: Any = [g for g in genres if g >= 0]
        if ids is not None:
            try:
                artist, genre = ids.artist_name(row[3]), ids.genre_name(genres)
            except KeyError:
                pass
        return dict(total_length=row[0], offset=row[1], sample_length=row[2], artist=artist,
                    genre=genre, lyrics=self.text.textise(row[4 + self.max_genre_words:]))


def window_labels(labels: Labels, start: int, raw_to_tokens: int, sample_length: int,
                  return_indices: bool = False
                  ) -> torch.Tensor | tuple[torch.Tensor, list[list[int]]]:
    """Label rows (N, 4 + G + n_tokens) for the window beginning at token ``start``.

    ``sample_length`` is the prior's window length in samples (n_ctx * raw_to_tokens); the offset
    advances by ``start * raw_to_tokens`` and lyrics are re-selected around the window midpoint
    (float32 midpoint). With ``return_indices`` also returns each lyric token's source index
    (-1 = padding; empty lists when the prior has no lyrics). ``labels`` is not modified.
    """
    y = labels.y.clone()
    y[:, 2] = int(sample_length)
    y[:, 1] += int(start * raw_to_tokens)
    indices: list[list[int]] = [[] for _ in range(y.shape[0])]
    n = labels.n_tokens
    if n > 0:
        rows = y[:, :3].tolist()
        tokens = []
        for i, (total, offset, duration) in enumerate(rows):
            toks, indices[i] = relevant_lyric_tokens(labels.full_tokens[i], n, total, offset,
                                                     duration, float32=True)
            tokens.append(toks)
        y[:, -n:] = torch.tensor(tokens, dtype=torch.int64, device=y.device)
    return (y, indices) if return_indices else y


def get_starts(total_length: int, n_ctx: int, hop_length: int) -> list[int]:
    """Window starts (in tokens) over a sequence of ``total_length`` tokens.

    ``range(0, total - n_ctx + hop, hop)`` with the last start pulled back to ``total - n_ctx``
    so that every window is full. A sequence no longer than ``n_ctx`` is a single window at 0.
    """
    if n_ctx <= 0 or hop_length <= 0 or total_length <= 0:
        raise ValueError(f"need positive total_length, n_ctx and hop_length, got "
                         f"{total_length}, {n_ctx}, {hop_length}")
    if total_length <= n_ctx:
        return [0]
    last = total_length - n_ctx
    return [min(s, last) for s in range(0, last + hop_length, hop_length)]
