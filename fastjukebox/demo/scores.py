"""Chorale scores -> note events (onset/duration in seconds, MIDI pitch, voice) plus key metadata.

The scores are the Bach chorales bundled inside the ``music21`` wheel (its ``corpus/bach``
folder), so nothing is downloaded. Pieces are identified by file stem (``bwv26.6``) and always
come in the order of their corpus-relative path; when one chorale ships in several formats the
MusicXML copy wins.

Only the four chorus voices are kept (soprano, alto, tenor, bass: parts found by name, or the
four parts in order when a four-part score has no recognisable names); obbligato instruments,
continuo and timpani are dropped. Ties are merged, grace notes dropped, and a chord inside one
voice becomes several notes of that voice.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..progress import track

VOICES = ("soprano", "alto", "tenor", "bass")
DEFAULT_TEMPO_QPM = 88.0  # quarter notes per minute: a calm chorale tempo
SCORE_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn")  # preferred first when a stem repeats


class ScoreError(ValueError):
    """A score that cannot be turned into four-voice note events."""


def _music21():
    try:
        import music21
    except ImportError as e:  # a declared dependency of the ``demo`` and ``test`` extras
        raise ImportError("the demo corpus needs music21 (its Bach chorales are the source): "
                          "pip install 'fastjukebox[demo]'") from e
    return music21


@dataclass(frozen=True)
class ScoreEvents:
    """One chorale as note events. All arrays have shape ``(N,)`` and are sorted by
    ``(onset, voice, pitch)``; the first onset is 0.

    onset, duration: float64 seconds.  pitch: int64 MIDI note numbers.
    voice: int64 index into ``VOICES``.  tonic/mode: key (``mode`` is "major" or "minor").
    n_parts: parts in the source score (instruments included).
    """

    name: str
    source: str
    onset: np.ndarray
    duration: np.ndarray
    pitch: np.ndarray
    voice: np.ndarray
    tonic: str
    mode: str
    n_parts: int
    tempo_qpm: float

    def __post_init__(self):
        n = self.onset.shape
        if not (len(n) == 1 and self.duration.shape == n and self.pitch.shape == n and self.voice.shape == n):
            raise ScoreError(f"{self.name}: onset/duration/pitch/voice must be 1-D arrays of one length")
        if n[0] == 0:
            raise ScoreError(f"{self.name}: no notes")
        if self.mode not in ("major", "minor"):
            raise ScoreError(f"{self.name}: mode must be 'major' or 'minor', got {self.mode!r}")
        if np.any(self.duration <= 0) or np.any(self.onset < 0):
            raise ScoreError(f"{self.name}: durations must be > 0 and onsets >= 0")

    @property
    def n_notes(self) -> int:
        return int(self.onset.shape[0])

    @property
    def duration_s(self) -> float:
        """End of the last note, in seconds."""
        return float(np.max(self.onset + self.duration))

    def transposed(self, semitones: int) -> "ScoreEvents":
        """The same piece shifted by ``semitones`` (the tonic name is respelled with sharps)."""
        if int(semitones) != semitones:
            raise ValueError(f"transposition must be a whole number of semitones, got {semitones}")
        tonic = self.tonic
        if semitones:
            tonic = _PITCH_NAMES[(_pitch_class(self.tonic) + int(semitones)) % 12]
        return dataclasses.replace(self, pitch=self.pitch + int(semitones), tonic=tonic)

    def stretched(self, speed: float) -> "ScoreEvents":
        """The same piece played ``speed`` times as fast (1.1 = 10% faster, shorter audio)."""
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        return dataclasses.replace(self, onset=self.onset / speed, duration=self.duration / speed,
                                   tempo_qpm=self.tempo_qpm * speed)


_PITCH_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def _pitch_class(name: str) -> int:
    base = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}[name[0].upper()]
    return (base + name.count("#") - name.count("-") - name.count("b", 1)) % 12


def corpus_root() -> Path:
    """music21's bundled corpus folder (the paths below are relative to it)."""
    return Path(_music21().common.getCorpusFilePath())


def chorale_paths() -> list[Path]:
    """Every Bach score bundled with music21, one file per stem, sorted by corpus-relative path."""
    root = corpus_root()
    folder = root / "bach"
    if not folder.is_dir():
        raise FileNotFoundError(f"music21's corpus has no Bach folder at {folder}: is music21 fully installed?")
    best: dict[str, Path] = {}
    for p in folder.rglob("*"):
        if p.suffix.lower() not in SCORE_SUFFIXES or not p.is_file():
            continue
        rank = SCORE_SUFFIXES.index(p.suffix.lower())
        old = best.get(p.stem)
        if old is None or (rank, str(p)) < (SCORE_SUFFIXES.index(old.suffix.lower()), str(old)):
            best[p.stem] = p
    return sorted(best.values(), key=lambda p: p.relative_to(root).as_posix())


def piece_name(path: str | Path) -> str:
    """The piece name of a score file: its stem, e.g. ``bwv26.6``."""
    return Path(path).stem


def _voice_of(part_name: str | None) -> int | None:
    words = (part_name or "").replace("\r", " ").split()
    if not words:
        return None
    word = words[0].lower().rstrip("0123456789.,:")
    return VOICES.index(word) if word in VOICES else None


def _satb_parts(score) -> list:
    """The soprano, alto, tenor and bass parts of ``score``, in that order."""
    parts = list(score.parts)
    found: dict[int, object] = {}
    for part in parts:
        v = _voice_of(part.partName)
        if v is not None and v not in found:  # "Soprano 1" then "Soprano 2": the first one sings
            found[v] = part
    if len(found) == 4:
        return [found[v] for v in range(4)]
    if len(parts) == 4 and not found:
        return parts
    names = [p.partName for p in parts]
    raise ScoreError(f"no soprano/alto/tenor/bass parts (part names: {names})")


def _key(score) -> tuple[str, str]:
    """(tonic name, "major"|"minor") by music21's key analysis, else the first key signature."""
    try:
        k = score.analyze("key")
        if k.mode in ("major", "minor"):
            return k.tonic.name, k.mode
    except Exception:  # analysis can fail on unusual scores; the signature is the fallback
        pass
    for ks in score.flatten().getElementsByClass("KeySignature"):
        mode = getattr(ks, "mode", None)  # a ``Key`` is a key signature that knows its mode
        if mode in ("major", "minor"):
            return ks.tonic.name, mode
        return ks.asKey("major").tonic.name, "major"
    raise ScoreError("no key: analysis failed and there is no key signature")


def events_from_score(score, name: str, source: str = "", tempo_qpm: float = DEFAULT_TEMPO_QPM) -> ScoreEvents:
    """Note events of a parsed music21 score (see module docstring for what is kept)."""
    if not tempo_qpm > 0:
        raise ValueError(f"tempo_qpm must be > 0, got {tempo_qpm}")
    spq = 60.0 / tempo_qpm  # seconds per quarter note
    rows: list[tuple[float, float, int, int]] = []
    for v, part in enumerate(_satb_parts(score)):
        flat = part.stripTies(inPlace=False).flatten()
        for n in flat.notes:
            ql = float(n.quarterLength)
            if ql <= 0:  # grace notes
                continue
            for p in n.pitches:
                rows.append((float(n.offset), ql, int(round(p.ps)), v))
    if not rows:
        raise ScoreError("the voices have no notes")
    arr = np.array(rows, dtype=np.float64)
    arr = arr[np.lexsort((arr[:, 2], arr[:, 3], arr[:, 0]))]
    onset_q = arr[:, 0] - arr[:, 0].min()
    tonic, mode = _key(score)
    return ScoreEvents(name=name, source=source, onset=onset_q * spq, duration=arr[:, 1] * spq,
                       pitch=arr[:, 2].astype(np.int64), voice=arr[:, 3].astype(np.int64),
                       tonic=tonic, mode=mode, n_parts=len(score.parts), tempo_qpm=float(tempo_qpm))


def load_score(path: str | Path, tempo_qpm: float = DEFAULT_TEMPO_QPM) -> ScoreEvents:
    """Parse one score file into events; raises ``ScoreError`` for pieces that cannot be used."""
    m21 = _music21()
    path = Path(path)
    try:
        score = m21.converter.parse(str(path))
    except Exception as e:
        raise ScoreError(f"{path.name}: music21 could not parse it: {e}") from e
    if not hasattr(score, "parts") or len(score.parts) == 0:
        raise ScoreError(f"{path.name}: no parts")
    try:
        source = path.relative_to(corpus_root()).as_posix()
    except ValueError:
        source = path.as_posix()
    try:
        return events_from_score(score, piece_name(path), source, tempo_qpm)
    except ScoreError as e:
        raise ScoreError(f"{path.name}: {e}") from None


def load_scores(paths=None, *, tempo_qpm: float = DEFAULT_TEMPO_QPM, limit: int | None = None,
                progress: bool = False) -> tuple[list[ScoreEvents], dict[str, str]]:
    """Events of every usable chorale (``paths`` defaults to ``chorale_paths()``), in path order.

    Returns ``(scores, skipped)`` where ``skipped`` maps the name of each unusable piece to the
    reason. ``limit`` stops after that many usable pieces.
    """
    paths = chorale_paths() if paths is None else list(paths)
    scores: list[ScoreEvents] = []
    skipped: dict[str, str] = {}
    for p in track(paths, "scores", "piece", enabled=progress):
        if limit is not None and len(scores) >= limit:
            break
        try:
            scores.append(load_score(p, tempo_qpm))
        except ScoreError as e:
            skipped[piece_name(p)] = str(e)
    return scores, skipped
