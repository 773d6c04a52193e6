"""Held-out chorale excerpts shipped with the demo family, for upsampling out of the box.

One excerpt per instrument set (``corpus.ARTISTS``), the first ``EXCERPT_SECONDS`` of the first
held-out chorale voiced by it (held-out pieces are never used in training). Each is a FLAC file
in ``fastjukebox/assets/demo/excerpts/`` with an entry in ``excerpts.json``: the piece, its labels
(artist = instrument set, genre = key mode), where the excerpt sits in the piece, the excerpt's
score text (:mod:`.score_text`, to measure how well audio made from it plays its notes) and the
file's SHA-256, checked on every read.

On the command line an excerpt is named ``demo:<instrument set>`` (``demo:strings``) or
``demo:<piece>`` (``demo:bwv116.6``)::

    fastjukebox upsample --model demo --from-audio demo:strings --out up.wav

``python -m fastjukebox.demo excerpts`` writes them again from the demo corpus (needs music21);
the rendering is deterministic, so the files decode to the same samples.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path

EXCERPTS_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo" / "excerpts"
MANIFEST_NAME = "excerpts.json"
EXCERPT_SECONDS = 10.0
SOURCE_PREFIX = "demo:"


@dataclass(frozen=True)
class Excerpt:
    name: str               # the instrument set
    piece: str              # the held-out chorale
    artist: int
    genre: int
    offset_seconds: float   # where the excerpt starts in the piece
    seconds: float
    piece_seconds: float
    score_text: str
    file: str               # FLAC file name in the excerpts directory
    sha256: str

    def path(self, directory: Path = EXCERPTS_DIR) -> Path:
        return Path(directory) / self.file


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(directory: str | os.PathLike = EXCERPTS_DIR) -> list[Excerpt]:
    """The excerpts in ``directory`` (shipped ones by default), in instrument-set order."""
    path = Path(directory) / MANIFEST_NAME
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no demo excerpts: {path} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    try:
        return [Excerpt(**e) for e in entries]
    except TypeError as e:
        raise ValueError(f"{path}: not an excerpt manifest ({e})") from None


def get_excerpt(name: str, directory: str | os.PathLike = EXCERPTS_DIR) -> Excerpt:
    """The excerpt called ``name`` (an instrument set or a piece; ``demo:`` in front is allowed)."""
    key = name[len(SOURCE_PREFIX):] if name.startswith(SOURCE_PREFIX) else name
    excerpts = read_manifest(directory)
    for e in excerpts:
        if key in (e.name, e.piece):
            return e
    known = ", ".join(f"{SOURCE_PREFIX}{e.name} ({e.piece})" for e in excerpts)
    raise ValueError(f"unknown demo excerpt {name!r}; the shipped ones are {known}")


def excerpt_audio(excerpt: Excerpt, directory: str | os.PathLike = EXCERPTS_DIR):
    """The excerpt's audio, (T,) float32 in [-1, 1] at 44.1 kHz, after checking its SHA-256."""
    from ..audio import load_audio
    path = excerpt.path(Path(directory))
    if not path.exists():
        raise ValueError(f"demo excerpt {excerpt.name!r}: {path} is missing")
    if _sha256(path) != excerpt.sha256:
        raise ValueError(f"demo excerpt {excerpt.name!r}: {path} is corrupt (its SHA-256 differs from "
                         f"{MANIFEST_NAME}'s)")
    return load_audio(path, resample=False)


def is_excerpt_source(text: str) -> bool:
    return text.startswith(SOURCE_PREFIX)


def build_excerpts(directory: str | os.PathLike = EXCERPTS_DIR, seconds: float = EXCERPT_SECONDS,
                   cache_dir=None, progress: bool = True) -> list[Excerpt]:
    """Write one excerpt per instrument set from the held-out demo corpus (FLAC files and the
    manifest, each atomically) and return them."""
    import soundfile as sf

    from .corpus import ARTISTS, SR, build_corpus
    from .score_text import crop_text

    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    held = build_corpus("heldout", augment=False, cache_dir=cache_dir, progress=progress)
    n = int(round(seconds * SR))
    out = []
    for artist, name in enumerate(ARTISTS):
        piece = next((p for p in held if p.artist == artist and len(p.audio) >= n), None)
        if piece is None:
            raise ValueError(f"no held-out chorale of at least {seconds:g} s is voiced by {name!r}")
        file = f"{name}.flac"
        with atomic_path(directory / file) as tmp:   # int16 as rendered: lossless, bit for bit
            sf.write(tmp, np.asarray(piece.audio[:n], dtype=np.int16), SR, format="FLAC", subtype="PCM_16")
        out.append(Excerpt(name=name, piece=piece.name, artist=piece.artist, genre=piece.genre,
                           offset_seconds=0.0, seconds=n / SR, piece_seconds=piece.seconds,
                           score_text=crop_text(piece.score_text, n, SR), file=file,
                           sha256=_sha256(directory / file)))
    with atomic_path(directory / MANIFEST_NAME) as tmp:
        Path(tmp).write_text(json.dumps([asdict(e) for e in out], indent=1) + "\n", encoding="utf-8")
    return out


def excerpt_agreement(audio, excerpt: Excerpt, directory: str | os.PathLike = EXCERPTS_DIR) -> dict:
    """``{"own", "other_excerpts"}``: ``evaluate.score_agreement`` of ``audio`` (T,) with the
    excerpt's score and, as the chance level, its mean over the other excerpts' scores."""
    from .evaluate import score_agreement
    a = np.asarray(audio, dtype=np.float32).reshape(-1)
    others = [e.score_text for e in read_manifest(directory) if e.name != excerpt.name]
    return {"own": score_agreement(a, excerpt.score_text),
            "other_excerpts": float(np.mean([score_agreement(a, t) for t in others])) if others else None}


def upsample_excerpt(jb, excerpt: Excerpt, *, seconds: float | None = None, n_samples: int = 1, **sampling):
    """What ``fastjukebox upsample --from-audio demo:<name>`` samples: the excerpt (its first
    ``seconds``) encoded to top-level codes, the levels below sampled with its labels;
    ``n_samples`` samples of the same top-level codes."""
    audio = excerpt_audio(excerpt)
    if seconds is not None:
        audio = audio[: int(round(seconds * jb.sr))]
    top = jb.vqvae.encode(jb.vqvae.whole_top_codes(audio, f"excerpt {excerpt.name!r}"),
                          levels=(jb.vqvae.config.levels - 1,))[-1]
    return jb.upsample(top.expand(n_samples, -1), artist=excerpt.artist, genre=excerpt.genre, total_seconds=excerpt.piece_seconds,
                       offset_seconds=excerpt.offset_seconds, **sampling)
