"""High-level sampling for a ``Jukebox`` bundle: labels from names, seconds to tokens, audio out.

``Jukebox.sample`` / ``upsample`` / ``continue_`` are thin wrappers over these functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .labels import LabelIds, Labeller, Labels
from .samplers import build_window_samplers, options_record
from .sampling import sample_levels
from .settings import SettingsError


@dataclass
class SampleResult:
    """codes: per level, level 0 first (None where nothing was sampled or given);
    audio: (N, T) float in [-1, 1] decoded from the lowest level present; sr: its sample rate;
    settings: the sampling settings as used (``fastjukebox.settings.resolve_sampling``: every knob
    and the sampler per sampled level, each sampler option by name, the seed) and the labels;
    level_seconds: wall time of each sampled level, in seconds; labels: the label rows per level
    the run started from (before the per-window adjustment, ``fastjukebox.labels.window_labels``),
    for the levels whose prior has labels."""

    codes: list[torch.Tensor | None]
    audio: torch.Tensor
    sr: int
    settings: dict = field(default_factory=dict)
    level_seconds: dict[int, float] = field(default_factory=dict)
    labels: dict[int, Labels] = field(default_factory=dict)


def _per_sample(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)) and not (name == "genre" and value and isinstance(value[0], int)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} samples")
        return list(value)
    return [value] * n


def make_labels(jb, *, artist, genre, lyrics: str | Sequence[str], n_samples: int, total_length: int,
                offset: int = 0, ids: Mapping[str, LabelIds] | LabelIds | None = None) -> dict[int, Labels]:
    """Initial labels per level (before the per-window adjustment).

    ``artist``/``genre``: names (resolved through ``ids``, the original id files) or numeric ids;
    one value for all samples or a list per sample. ``ids``: a ``LabelIds`` or {"v2": .., "v3": ..}.
    """
    artists = _per_sample(artist, n_samples, "artist")
    genres = _per_sample(genre, n_samples, "genre")
    texts = _per_sample(lyrics, n_samples, "lyrics")
    out = {}
    for level in jb.levels:
        c = jb.prior(level).config
        if not c.labels:
            continue
        version = "v3" if c.labels_v3 else "v2"
        table = ids.get(version) if isinstance(ids, Mapping) else ids
        labeller = Labeller(c.max_bow_genre_size, c.n_tokens, c.sample_length, version)
        rows = [labeller.label(a, g, t, total_length, offset, ids=table) for a, g, t in zip(artists, genres, texts)]
        out[level] = Labels.stack(rows)
    return out


def seconds_to_length(jb, seconds: float) -> int:
    """Audio samples for ``seconds``, rounded down to whole codes of the top level."""
    hop = jb.vqvae.hop_lengths[-1]
    n = int(seconds * jb.sr) // hop * hop
    if n <= 0:
        raise ValueError(f"{seconds} s is shorter than one top-level code ({hop / jb.sr * 1000:.1f} ms)")
    return n


def _finish(jb, codes, decode_level: int | None, settings: dict, level_seconds: dict | None = None,
            labels: dict | None = None) -> SampleResult:
    level = decode_level if decode_level is not None else min(l for l, z in enumerate(codes) if z is not None)
    audio = jb.vqvae.decode(codes[level], level).clamp(-1.0, 1.0)
    return SampleResult(codes, audio, jb.sr, settings, dict(level_seconds or {}), dict(labels or {}))


def _uniform(per_level: Mapping):
    """One value where every level has the same, else the mapping (a record of settings)."""
    values = list(per_level.values()) if isinstance(per_level, Mapping) else [per_level]
    return values[0] if all(v == values[0] for v in values) else dict(per_level)


def _label_record(labels_kw: dict, total: int, sr: int) -> dict:
    """The labels of a run as used (names or ids as given; ``song_seconds``: the song length the
    timing labels were made for)."""
    return dict(artist=labels_kw["artist"], genre=labels_kw["genre"], lyrics=labels_kw["lyrics"],
                song_seconds=total / sr, offset_seconds=labels_kw.get("offset", 0) / sr)


def run(jb, *, codes, levels, labels_kw: dict, sample_length: int, sampler: Mapping[int, str],
        sampler_options: Mapping[str, object], temperature, top_k, top_p, chunk_size, hop_fraction,
        max_batch_size: int, seed: int, progress: bool = True, sample_seeds=None,
        run_samples: int | None = None) -> SampleResult:
    """Sample ``levels`` with settings resolved by ``fastjukebox.settings.resolve_sampling``;
    ``sample_seeds``: one seed per sample (``fastjukebox.sample_seeds``), or None. The settings
    record the sampler options as used by name (``fastjukebox.samplers.options_record``).
    ``run_samples``: the samples of the whole run when this call draws a share of them (a process
    of a launch); the window samplers are built for the run's batch size,
    ``min(run_samples, max_batch_size)``, so every share decides alike."""
    given = labels_kw["n_samples"]
    if run_samples is not None and run_samples < given:
        raise SettingsError(f"run_samples ({run_samples}) is fewer than the {given} samples of this call")
    window_samplers = build_window_samplers(jb, sampler, sampler_options,
                                            batch=min(run_samples or given, max_batch_size))
    settings = dict(sampler=dict(sampler), **{k: _uniform(v) for k, v in dict(
        temperature=temperature, top_k=top_k, top_p=top_p, chunk_size=chunk_size, hop_fraction=hop_fraction).items()},
        max_batch_size=max_batch_size, run_samples=run_samples, seed=seed,
        **options_record(sampler, sampler_options, window_samplers),
        per_sample_seeds=sample_seeds is not None)
    top = jb.prior(max(levels)).config
    total = labels_kw.pop("total_length", None)
    if total is None:
        min_len = math.ceil((top.min_duration or 0) * top.sr) if top.time_signal else 0
        total = max(sample_length, min_len)
    labels = make_labels(jb, total_length=total, **labels_kw)
    priors = {l: jb.prior(l) for l in levels}
    level_seconds: dict[int, float] = {}
    zs = sample_levels(jb.vqvae, priors, labels, sample_length, codes=codes, levels=levels,
                       hop_fraction=hop_fraction, chunk_size=chunk_size, temperature=temperature,
                       top_k=top_k, top_p=top_p, max_batch_size=max_batch_size, seed=seed, progress=progress,
                       window_samplers=window_samplers, sample_seeds=sample_seeds, level_seconds=level_seconds)
    settings.update(_label_record(labels_kw, total, jb.sr))
    return _finish(jb, zs, min(levels), settings, level_seconds, labels)
