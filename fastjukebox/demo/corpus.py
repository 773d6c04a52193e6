"""The demo corpus: Bach chorales rendered to 44.1 kHz mono int16, with genre/artist labels.

* genre = key mode (``GENRES``); artist = the instrument set that voices the piece
  (``ARTISTS``, chosen by a hash of the piece name, augmentation included).
* split: a fixed ~10% of the chorales is held out, chosen by a hash of the piece name, so a
  piece never changes side when pieces are added. Held-out pieces are never augmented.
* augmentation (train split): each piece is rendered as written and in ``n_augment`` variants
  transposed by -2..+2 semitones and/or played at 0.9x / 1.1x speed, picked by hash. A variant is
  named like ``bwv26.6+2st@1.1x`` (``bwv26.6-1st@1x``, ``bwv26.6+0st@0.9x``).
* cache: every rendered piece is one ``<name>#<key>.npy`` (int16) plus a ``.json`` record under
  ``cache_dir``, written atomically. The key hashes everything the audio depends on (corpus
  version, score file bytes, music21 version, tempo, augmentation, voicing, synth settings), so a
  change renders afresh; records of older keys for the same name are removed. A cache hit needs
  no score parsing: the record also holds the piece's score text (``score_text``: its notes on a
  fixed time grid, :mod:`.score_text`); a record written before it existed gets it added
  from the score once.

CLI: ``python -m fastjukebox.demo.corpus [--split train|heldout] [--limit N] [--out DIR]``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..progress import progress_bar
from . import scores as sc
from . import synth
from .score_text import score_text

SR = synth.SR
CORPUS_VERSION = "chorales-1"
GENRES: list[str] = ["major", "minor"]
INSTRUMENT_SETS: dict[str, tuple[str, str, str, str]] = {  # soprano, alto, tenor, bass
    "consort": ("flute", "clarinet", "cello", "pedal"),
    "strings": ("violin", "viola", "cello", "double_bass"),
    "winds": ("flute", "oboe", "clarinet", "bassoon"),
    "organ": ("principal", "gedackt", "gamba", "pedal"),
    "brass": ("trumpet", "horn", "trombone", "tuba"),
}
ARTISTS: list[str] = list(INSTRUMENT_SETS)
TRANSPOSITIONS = (-2, -1, 0, 1, 2)
SPEEDS = (0.9, 1.0, 1.1)
N_AUGMENT = 1  # variants per train piece besides the original
HELDOUT_PER_MILLE = 100
TEMPO_QPM = sc.DEFAULT_TEMPO_QPM
SYNTH = synth.SynthConfig()
_VARIANT = re.compile(r"^(?P<base>.+?)(?P<st>[+-]\d+)st@(?P<speed>\d+(?:\.\d+)?)x$")


@dataclass
class Piece:
    """One rendered piece. ``audio``: ``(n_samples,)`` int16 mono at ``SR``; ``score_text``: its
    notes as text aligned with the audio (:mod:`.score_text`)."""

    name: str
    audio: np.ndarray
    genre: int
    artist: int
    split: str
    score_text: str = ""

    @property
    def base_name(self) -> str:
        return base_name(self.name)

    @property
    def seconds(self) -> float:
        return len(self.audio) / SR


def _hash_int(text: str, nbytes: int = 8) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:nbytes], "big")


def variant_name(base: str, semitones: int = 0, speed: float = 1.0) -> str:
    """``base`` for the original, else ``base{semitones:+d}st@{speed:g}x``."""
    if semitones == 0 and speed == 1.0:
        return base
    return f"{base}{int(semitones):+d}st@{speed:g}x"


def parse_variant(name: str) -> tuple[str, int, float]:
    """``(base name, semitones, speed)`` of a piece name (inverse of ``variant_name``)."""
    m = _VARIANT.match(name)
    if m is None:
        return name, 0, 1.0
    return m["base"], int(m["st"]), float(m["speed"])


def base_name(name: str) -> str:
    """The chorale a (possibly augmented) piece name comes from."""
    return parse_variant(name)[0]


def is_heldout(name: str) -> bool:
    """Whether the chorale of ``name`` is held out (a fixed ~10%, by hash of the base name)."""
    return _hash_int(base_name(name)) % 1000 < HELDOUT_PER_MILLE


def heldout_names(names) -> set[str]:
    """The names in ``names`` whose chorale is held out. Membership depends on the base name
    alone, so it never changes when pieces are added, and augmented copies follow their base."""
    return {n for n in names if is_heldout(n)}


def augmentations(base: str, n: int = N_AUGMENT) -> list[tuple[int, float]]:
    """``n`` distinct ``(semitones, speed)`` variants for ``base`` (never the identity), chosen
    by hash of the name and the variant."""
    grid = [(s, v) for s in TRANSPOSITIONS for v in SPEEDS if (s, v) != (0, 1.0)]
    if not 0 <= n <= len(grid):
        raise ValueError(f"n_augment must be in [0, {len(grid)}], got {n}")
    return sorted(grid, key=lambda sv: _hash_int(f"aug|{base}|{sv[0]}|{sv[1]}"))[:n]


def artist_of(name: str) -> int:
    """Index into ``ARTISTS`` of the instrument set voicing piece ``name`` (by hash)."""
    return _hash_int("artist|" + name) % len(ARTISTS)


def default_cache_dir() -> Path:
    """``$FASTJUKEBOX_CACHE/demo-corpus``, else ``~/.cache/fastjukebox/demo-corpus``."""
    root = os.environ.get("FASTJUKEBOX_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fastjukebox") / "demo-corpus"


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _music21_version() -> str:
    return sc._music21().__version__


def _cache_key(source_sha: str, name: str, tempo_qpm: float, config: synth.SynthConfig) -> str:
    _, semis, speed = parse_variant(name)
    voicing = INSTRUMENT_SETS[ARTISTS[artist_of(name)]]
    spec = {"corpus": CORPUS_VERSION, "source": source_sha, "music21": _music21_version(),
            "name": name, "tempo": tempo_qpm, "semitones": semis, "speed": speed,
            "timbres": [repr(synth.TIMBRES[t]) for t in voicing], "synth": repr(config),
            "genres": GENRES, "artists": ARTISTS}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


class _Cache:
    """``<name>#<key>.npy`` + ``.json`` records in one folder."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.keys: dict[str, set[str]] = {}
        for entry in os.scandir(root):
            stem, _, ext = entry.name.rpartition(".")
            if ext in ("json", "npy") and "#" in stem and not entry.name.startswith("."):
                name, _, key = stem.rpartition("#")
                self.keys.setdefault(name, set()).add(key)

    def _paths(self, name: str, key: str) -> tuple[Path, Path]:
        return self.root / f"{name}#{key}.json", self.root / f"{name}#{key}.npy"

    def audio_path(self, name: str, key: str) -> Path:
        return self._paths(name, key)[1]

    def load(self, name: str, key: str, *, verify: bool, mmap: bool):
        """The stored record (with ``audio``), None when absent; a broken one warns, is
        deleted and reads as absent."""
        meta_path, audio_path = self._paths(name, key)
        if key not in self.keys.get(name, ()) or not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != key or meta.get("name") != name:
                raise ValueError("record does not match its file name")
            if "skipped" in meta:
                return meta
            audio = np.load(audio_path, mmap_mode="r" if mmap else None, allow_pickle=False)
            if audio.dtype != np.int16 or audio.ndim != 1 or len(audio) != meta["n_samples"]:
                raise ValueError(f"audio is {audio.dtype} {audio.shape}, expected int16 ({meta['n_samples']},)")
            if verify and hashlib.sha256(np.ascontiguousarray(audio).tobytes()).hexdigest() != meta["sha256"]:
                raise ValueError("audio checksum mismatch")
        except Exception as e:  # any damage: say so and render again
            warnings.warn(f"demo corpus cache entry {audio_path.name} is unusable ({e}); rendering it again",
                          stacklevel=3)
            for p in (meta_path, audio_path):
                p.unlink(missing_ok=True)
            return None
        meta["audio"] = audio
        return meta

    def store(self, name: str, key: str, meta: dict, audio: np.ndarray | None = None) -> None:
        meta_path, audio_path = self._paths(name, key)
        if audio is not None:
            with atomic_path(audio_path) as tmp, open(tmp, "wb") as f:
                np.save(f, audio, allow_pickle=False)
            meta = {**meta, "n_samples": int(len(audio)),
                    "sha256": hashlib.sha256(audio.tobytes()).hexdigest()}
        with atomic_path(meta_path) as tmp:
            Path(tmp).write_text(json.dumps({**meta, "name": name, "key": key}, indent=1))
        for old in self.keys.get(name, set()) - {key}:  # records of superseded settings
            for p in self._paths(name, old):
                p.unlink(missing_ok=True)
        self.keys[name] = {key}


def variant_events(events: sc.ScoreEvents, name: str) -> sc.ScoreEvents:
    """Chorale ``events`` transposed and stretched as variant ``name`` says."""
    _, semis, speed = parse_variant(name)
    return events.transposed(semis).stretched(speed)


def render_piece(events: sc.ScoreEvents, name: str, config: synth.SynthConfig = SYNTH) -> np.ndarray:
    """Render chorale ``events`` as variant ``name`` (its transposition, speed and voicing):
    ``(n_samples,)`` int16."""
    ev = variant_events(events, name)
    voicing = INSTRUMENT_SETS[ARTISTS[artist_of(name)]]
    return synth.render(ev.onset, ev.duration, ev.pitch, ev.voice, voicing, config=config,
                        seed=_hash_int("seed|" + name, 4))


def _shrink(bar, n: int, limit: int | None) -> None:
    """A skipped chorale leaves the bar's total (a later one takes its place under ``limit``)."""
    if limit is None:
        bar.total -= n
        bar.refresh()


def build_corpus(split: str = "train", *, augment: bool = True, limit: int | None = None,
                 cache_dir: str | os.PathLike | None = None, progress: bool = True,
                 n_augment: int = N_AUGMENT, tempo_qpm: float = TEMPO_QPM,
                 config: synth.SynthConfig = SYNTH, verify: bool = True, mmap: bool = False,
                 report: dict | None = None) -> list[Piece]:
    """Render (or load from the cache) one split of the demo corpus, in corpus-path order.

    Args:
        split: "train" or "heldout".
        augment: add ``n_augment`` variants per train piece (ignored for "heldout").
        limit: use only the first ``limit`` usable chorales of the split.
        cache_dir: defaults to ``default_cache_dir()``.
        verify: check each cached file's sha256 (reads it whole); cheap header checks always run.
        mmap: return read-only memory maps of the cache files instead of arrays in memory
            (each keeps a file descriptor open).
        report: if given, filled with ``rendered``/``cached`` counts, ``skipped`` ({name: reason})
            and ``seconds`` spent.
    Returns:
        list of ``Piece``; each chorale's original comes before its variants.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    n_aug = n_augment if (augment and split == "train") else 0
    augmentations("", n_aug)  # validates n_augment
    t0 = time.perf_counter()
    cache = _Cache(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    paths = [p for p in sc.chorale_paths() if is_heldout(sc.piece_name(p)) == (split == "heldout")]
    per_piece = 1 + n_aug
    total = len(paths) if limit is None else min(limit, len(paths))
    stats = {"rendered": 0, "cached": 0, "skipped": {}}
    pieces: list[Piece] = []
    bar = progress_bar(total * per_piece, f"demo corpus ({split})", "piece", enabled=progress)
    used = 0
    for path in paths:
        if limit is not None and used >= limit:
            break
        base = sc.piece_name(path)
        source_sha = _file_sha(path)
        names = [base] + [variant_name(base, s, v) for s, v in augmentations(base, n_aug)]
        keys = [_cache_key(source_sha, n, tempo_qpm, config) for n in names]
        skip_key = keys[0] + "-score"
        skip = cache.load(base + "~score", skip_key, verify=False, mmap=False)
        if skip is not None:
            stats["skipped"][base] = skip["skipped"]
            _shrink(bar, per_piece, limit)
            continue
        events, mine = None, []
        for name, key in zip(names, keys):
            rec = cache.load(name, key, verify=verify, mmap=mmap)
            if rec is None or "score_text" not in rec:
                if events is None:
                    try:
                        events = sc.load_score(path, tempo_qpm)
                    except sc.ScoreError as e:
                        cache.store(base + "~score", skip_key, {"skipped": str(e)})
                        stats["skipped"][base] = str(e)
                        break
                variant = variant_events(events, name)
            if rec is None:
                audio = render_piece(events, name, config)
                rec = {"genre": GENRES.index(events.mode), "artist": artist_of(name),
                       "tonic": variant.tonic, "mode": events.mode,
                       "score_text": score_text(variant, len(audio))}
                cache.store(name, key, rec, audio)
                rec["audio"] = np.load(cache.audio_path(name, key), mmap_mode="r") if mmap else audio
                stats["rendered"] += 1
            else:
                if "score_text" not in rec:  # a record from before score texts: add it
                    rec["score_text"] = score_text(variant, int(rec["n_samples"]))
                    cache.store(name, key, {k: v for k, v in rec.items() if k != "audio"})
                stats["cached"] += 1
            mine.append(Piece(name=name, audio=rec["audio"], genre=int(rec["genre"]),
                              artist=int(rec["artist"]), split=split, score_text=rec["score_text"]))
        if base in stats["skipped"]:
            _shrink(bar, per_piece, limit)
            continue
        pieces.extend(mine)
        bar.update(len(mine))
        used += 1
    bar.close()
    stats["seconds"] = time.perf_counter() - t0
    if stats["skipped"]:
        warnings.warn(f"demo corpus: skipped {len(stats['skipped'])} unusable score(s): "
                      + "; ".join(f"{k}: {v}" for k, v in sorted(stats["skipped"].items())), stacklevel=2)
    if report is not None:
        report.update(stats)
    return pieces


def corpus_stats(pieces: list[Piece]) -> dict:
    """Counts and durations: ``count``, ``chorales``, ``seconds``, ``per_genre``, ``per_artist``,
    ``per_split`` (names as keys)."""
    def count(labels, values):
        return {k: sum(1 for v in values if labels[v] == k) for k in dict.fromkeys(labels.values())}

    return {
        "count": len(pieces),
        "chorales": len({p.base_name for p in pieces}),
        "seconds": float(sum(p.seconds for p in pieces)),
        "per_genre": count(dict(enumerate(GENRES)), [p.genre for p in pieces]),
        "per_artist": count(dict(enumerate(ARTISTS)), [p.artist for p in pieces]),
        "per_split": {s: sum(1 for p in pieces if p.split == s) for s in ("train", "heldout")},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastjukebox.demo.corpus", description=__doc__.split("\n")[0])
    ap.add_argument("--split", choices=("train", "heldout"), default="train")
    ap.add_argument("--limit", type=int, default=None, help="only the first N chorales of the split")
    ap.add_argument("--no-augment", action="store_true", help="train split without augmented variants")
    ap.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()}")
    ap.add_argument("--out", default=None, help="write a few pieces as .wav files here for listening")
    ap.add_argument("--n-wav", type=int, default=4, help="how many .wav files --out gets")
    args = ap.parse_args(argv)
    report: dict = {}
    pieces = build_corpus(args.split, augment=not args.no_augment, limit=args.limit,
                          cache_dir=args.cache_dir, report=report)
    stats = corpus_stats(pieces)
    stats.update(rendered=report["rendered"], cached=report["cached"], skipped=len(report["skipped"]),
                 build_seconds=round(report["seconds"], 1), hours=round(stats["seconds"] / 3600, 3))
    print(json.dumps(stats, indent=1))
    if args.out:
        import soundfile as sf

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for p in pieces[: max(0, args.n_wav)]:
            path = out / f"{p.name}.{GENRES[p.genre]}.{ARTISTS[p.artist]}.wav"
            sf.write(path, np.asarray(p.audio), SR, subtype="PCM_16")
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
