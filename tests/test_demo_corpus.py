"""Demo corpus: chorale scores, the synthesizer and the cached, split and augmented corpus."""
from __future__ import annotations

import hashlib
import itertools
import warnings

import numpy as np
import pytest

from fastjukebox.demo import corpus as cp
from fastjukebox.demo import scores as sc
from fastjukebox.demo import synth
from fastjukebox.text import VOCAB_V2

FAST_TEMPO = 240.0  # quarter notes per minute: short renders keep the tests quick


@pytest.fixture(scope="module")
def m21():
    try:
        import music21
    except ImportError:
        pytest.fail("music21 is a test dependency (the demo corpus is built from its Bach chorales): "
                    "pip install -e '.[test]'")
    return music21


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory, m21):
    """A cache holding the first two train chorales, each with one augmented variant."""
    root = tmp_path_factory.mktemp("demo-cache")
    report: dict = {}
    pieces = cp.build_corpus("train", limit=2, cache_dir=root, progress=False, tempo_qpm=FAST_TEMPO,
                             n_augment=1, report=report)
    return root, pieces, report


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _harmonic_profile(audio: np.ndarray, f0: float, n: int = 8) -> np.ndarray:
    """Levels in dB (re the strongest, floored at -60) of harmonics 1..n of ``audio`` (middle of a
    held note)."""
    seg = audio[len(audio) // 4: 3 * len(audio) // 4].astype(np.float64)
    spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
    freqs = np.fft.rfftfreq(len(seg), 1 / synth.SR)
    mags = np.array([spec[np.abs(freqs - k * f0) < 0.03 * f0].max() for k in range(1, n + 1)])
    return np.maximum(20 * np.log10(mags / mags.max()), -60.0)


def test_music21_ships_enough_chorales(m21):
    paths = sc.chorale_paths()
    names = [sc.piece_name(p) for p in paths]
    assert len(paths) >= 300
    assert len(set(names)) == len(names)
    rel = [p.relative_to(sc.corpus_root()).as_posix() for p in paths]
    assert rel == sorted(rel)


def test_score_events_keep_four_voices(m21):
    """bwv112.5-sc has seven parts (two cornets and an oboe besides the choir): only SATB remain."""
    path = next(p for p in sc.chorale_paths() if sc.piece_name(p) == "bwv112.5-sc")
    ev = sc.load_score(path)
    assert ev.n_parts == 7 and ev.name == "bwv112.5-sc"
    assert set(ev.voice.tolist()) == {0, 1, 2, 3}
    tenor = next(p for p in m21.converter.parse(str(path)).parts if p.partName == "Tenor")
    notes = tenor.stripTies(inPlace=False).flatten().notes
    assert ev.pitch[ev.voice == 2].tolist() == [n.pitch.midi for n in notes]
    assert ev.onset.min() == 0 and np.all(np.diff(ev.onset) >= 0)
    means = [ev.pitch[ev.voice == v].mean() for v in range(4)]
    assert means == sorted(means, reverse=True)  # soprano highest, bass lowest
    assert ev.mode in ("major", "minor") and ev.tonic[0] in "ABCDEFG"
    quarter = 60.0 / sc.DEFAULT_TEMPO_QPM
    beats = ev.duration / quarter
    assert np.allclose(beats * 12, np.round(beats * 12))  # seconds come from quarter lengths


def test_unusable_score_is_an_error(m21):
    piano = next(p for p in sc.chorale_paths() if sc.piece_name(p) == "bwv846")  # a keyboard prelude
    with pytest.raises(sc.ScoreError, match="soprano/alto/tenor/bass"):
        sc.load_score(piano)
    scores, skipped = sc.load_scores([piano], progress=False)
    assert scores == [] and "bwv846" in skipped


def test_unusable_score_is_skipped_and_remembered(tmp_path, monkeypatch, m21):
    paths = {sc.piece_name(p): p for p in sc.chorale_paths()}
    monkeypatch.setattr(sc, "chorale_paths", lambda: [paths["bwv846"], paths["bwv10.7"]])
    monkeypatch.setattr(cp, "is_heldout", lambda name: False)
    kw = dict(cache_dir=tmp_path, progress=False, tempo_qpm=FAST_TEMPO, augment=False)
    report: dict = {}
    with pytest.warns(UserWarning, match="skipped 1 unusable"):
        pieces = cp.build_corpus("train", report=report, **kw)
    assert [p.name for p in pieces] == ["bwv10.7"] and list(report["skipped"]) == ["bwv846"]

    def no_parsing(*args, **kwargs):
        raise AssertionError("a cached corpus must not parse scores")

    monkeypatch.setattr(sc, "load_score", no_parsing)
    with pytest.warns(UserWarning, match="bwv846"):
        again = cp.build_corpus("train", report=report, **kw)
    assert [p.name for p in again] == ["bwv10.7"] and report["cached"] == 1 and report["rendered"] == 0


def test_heldout_is_a_stable_tenth(m21):
    names = [sc.piece_name(p) for p in sc.chorale_paths()]
    held = cp.heldout_names(names)
    assert 0.07 <= len(held) / len(names) <= 0.13
    rng = np.random.default_rng(7)
    subset = [n for n in names if rng.random() < 0.37]
    assert cp.heldout_names(subset) == held & set(subset)  # membership ignores the other pieces
    for n in list(held)[:5] + names[:5]:
        for s, v in cp.augmentations(n, 3):
            assert cp.is_heldout(cp.variant_name(n, s, v)) == (n in held)


def test_variant_names_round_trip():
    for base, s, v in itertools.product(["bwv26.6", "bwv248.12-2", "bwv18.5-lz"], [-2, 0, 1], [0.9, 1.0, 1.1]):
        name = cp.variant_name(base, s, v)
        assert cp.parse_variant(name) == (base, s, v)
        assert (name == base) == ((s, v) == (0, 1.0))
    assert cp.variant_name("bwv26.6", 2, 1.1) == "bwv26.6+2st@1.1x"
    picks = cp.augmentations("bwv26.6", 3)
    assert len(set(picks)) == 3 and (0, 1.0) not in picks and picks == cp.augmentations("bwv26.6", 3)
    with pytest.raises(ValueError, match="n_augment"):
        cp.augmentations("bwv26.6", 99)


def test_train_and_heldout_are_disjoint(train_dir, tmp_path):
    root, train, _ = train_dir
    held = cp.build_corpus("heldout", limit=1, cache_dir=tmp_path, progress=False, tempo_qpm=FAST_TEMPO)
    assert len(train) == 4 and len(held) == 1
    assert {p.split for p in train} == {"train"} and held[0].split == "heldout"
    assert held[0].name == held[0].base_name  # never augmented
    assert not ({p.base_name for p in train} & {p.base_name for p in held})
    assert not cp.heldout_names([p.name for p in train])
    assert cp.heldout_names([p.name for p in held]) == {held[0].name}
    assert [p.name for p in train][::2] == [p.base_name for p in train][::2]  # original first
    assert train[1].name != train[1].base_name == train[0].name


def test_rendered_audio_properties(train_dir, m21):
    _, pieces, _ = train_dir
    peak = round(32767 * 10 ** (-1 / 20))
    for p in pieces:
        a = p.audio
        assert a.dtype == np.int16 and a.ndim == 1
        assert abs(int(np.abs(a.astype(np.int32)).max()) - peak) <= 1  # normalised to -1 dBFS
        assert np.sqrt(np.mean(a.astype(np.float64) ** 2)) > 1000  # not silent
        assert 0 <= p.genre < len(cp.GENRES) and 0 <= p.artist < len(cp.ARTISTS)
        assert p.artist == cp.artist_of(p.name)
        base, semis, speed = cp.parse_variant(p.name)
        path = next(q for q in sc.chorale_paths() if sc.piece_name(q) == base)
        ev = sc.load_score(path, FAST_TEMPO)
        assert p.genre == cp.GENRES.index(ev.mode)
        assert len(a) == synth.n_samples(ev.duration_s / speed)  # length follows the score
    stats = cp.corpus_stats(pieces)
    assert stats["count"] == 4 and stats["chorales"] == 2
    assert stats["seconds"] == pytest.approx(sum(len(p.audio) for p in pieces) / cp.SR)
    assert sum(stats["per_genre"].values()) == 4 and stats["per_split"] == {"train": 4, "heldout": 0}


def test_render_is_deterministic(train_dir):
    _, pieces, _ = train_dir
    p = pieces[1]  # an augmented variant: transposition, speed and voicing all play a part
    base, _, _ = cp.parse_variant(p.name)
    ev = sc.load_score(next(q for q in sc.chorale_paths() if sc.piece_name(q) == base), FAST_TEMPO)
    first = cp.render_piece(ev, p.name)
    second = cp.render_piece(ev, p.name)
    assert _sha(first) == _sha(second) == _sha(p.audio)
    other = cp.render_piece(ev, p.base_name)
    assert _sha(other) != _sha(first)


def test_cache_round_trip(train_dir):
    root, pieces, report = train_dir
    assert report["rendered"] == 4 and report["cached"] == 0
    again: dict = {}
    loaded = cp.build_corpus("train", limit=2, cache_dir=root, progress=False, tempo_qpm=FAST_TEMPO,
                             n_augment=1, report=again)
    assert again["rendered"] == 0 and again["cached"] == 4
    assert [p.name for p in loaded] == [p.name for p in pieces]
    for a, b in zip(loaded, pieces):
        assert np.array_equal(a.audio, b.audio) and (a.genre, a.artist) == (b.genre, b.artist)
    mm = cp.build_corpus("train", limit=1, cache_dir=root, progress=False, tempo_qpm=FAST_TEMPO,
                         n_augment=1, mmap=True, verify=False)
    assert isinstance(mm[0].audio, np.memmap) and np.array_equal(mm[0].audio, pieces[0].audio)


def test_corrupt_cache_is_rendered_again(tmp_path, m21):
    kw = dict(limit=1, cache_dir=tmp_path, progress=False, tempo_qpm=FAST_TEMPO)
    ref = cp.build_corpus("heldout", **kw)[0].audio
    (npy,) = tmp_path.glob("*.npy")
    raw = bytearray(npy.read_bytes())
    raw[len(raw) // 2] ^= 0x40  # one flipped bit in the samples
    npy.write_bytes(bytes(raw))
    report: dict = {}
    with pytest.warns(UserWarning, match="checksum"):
        got = cp.build_corpus("heldout", report=report, **kw)[0].audio
    assert report["rendered"] == 1 and np.array_equal(got, ref)
    npy.write_bytes(npy.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match="unusable"):
        got = cp.build_corpus("heldout", report=report, **kw)[0].audio
    assert np.array_equal(got, ref)
    (meta,) = tmp_path.glob("*.json")
    meta.write_text("{not json")
    with pytest.warns(UserWarning, match="unusable"):
        got = cp.build_corpus("heldout", report=report, **kw)[0].audio
    assert np.array_equal(got, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cp.build_corpus("heldout", report=report, **kw)
    assert report["rendered"] == 0


def test_changed_settings_invalidate_the_cache(tmp_path, m21):
    kw = dict(limit=1, cache_dir=tmp_path, progress=False, tempo_qpm=FAST_TEMPO)
    a = cp.build_corpus("heldout", **kw)[0].audio
    report: dict = {}
    b = cp.build_corpus("heldout", config=synth.SynthConfig(wet=0.05), report=report, **kw)[0].audio
    assert report["rendered"] == 1 and len(a) == len(b) and not np.array_equal(a, b)
    assert len(list(tmp_path.glob("*.npy"))) == 1  # the superseded record is gone


def test_voices_have_different_spectra():
    f0 = float(synth.midi_hz(55))
    for set_name, voicing in cp.INSTRUMENT_SETS.items():
        profiles = [_harmonic_profile(synth.render([0.0], [1.0], [55], [0], [t], seed=3), f0) for t in voicing]
        for (i, a), (j, b) in itertools.combinations(enumerate(profiles), 2):
            gap = float(np.mean(np.abs(a - b)))
            assert gap > 3.0, f"{set_name}: {voicing[i]} and {voicing[j]} sound alike ({gap:.1f} dB)"


def test_octave_transposition_doubles_the_fundamental():
    rng = np.random.default_rng(11)
    pitch = int(rng.integers(50, 70))
    ev = sc.ScoreEvents(name="one", source="", onset=np.array([0.0]), duration=np.array([1.3]),
                        pitch=np.array([pitch]), voice=np.array([0]), tonic="C", mode="major", n_parts=1,
                        tempo_qpm=60.0)

    def peak_hz(e):
        a = synth.render(e.onset, e.duration, e.pitch, e.voice, ["gedackt"], seed=5).astype(np.float64)
        n = 1 << 18
        spec = np.abs(np.fft.rfft(a * np.hanning(len(a)), n))
        return np.argmax(spec) * synth.SR / n

    low, high = peak_hz(ev), peak_hz(ev.transposed(12))
    assert low == pytest.approx(synth.midi_hz(pitch), rel=0.01)
    assert high / low == pytest.approx(2.0, rel=0.005)
    assert ev.transposed(12).tonic == "C" and ev.transposed(3).tonic == "D#"
    assert ev.stretched(2.0).duration_s == pytest.approx(0.65)


def test_synth_render_is_seeded_and_sized():
    rng = np.random.default_rng(2)
    n = 37
    onset = np.sort(rng.uniform(0, 3.1, n))
    dur = rng.uniform(0.05, 0.9, n)
    pitch = rng.integers(40, 80, n)
    voice = rng.integers(0, 4, n)
    voicing = cp.INSTRUMENT_SETS["winds"]
    a = synth.render(onset, dur, pitch, voice, voicing, seed=9)
    b = synth.render(onset, dur, pitch, voice, voicing, seed=9)
    c = synth.render(onset, dur, pitch, voice, voicing, seed=10)
    assert _sha(a) == _sha(b) != _sha(c)
    assert len(a) == synth.n_samples(float(np.max(onset + dur)))


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="voice"):
        synth.render([0.0], [1.0], [60], [4], ["flute"] * 4)
    with pytest.raises(ValueError, match="pitches"):
        synth.render([0.0], [1.0], [60.5], [0], ["flute"])
    with pytest.raises(ValueError, match="durations"):
        synth.render([0.0], [0.0], [60], [0], ["flute"])
    with pytest.raises(ValueError, match="silent"):
        synth.to_int16(np.zeros(10))
    with pytest.raises(ValueError, match="table_size"):
        synth.SynthConfig(table_size=1000)
    with pytest.raises(ValueError, match="split"):
        cp.build_corpus("dev", progress=False)
    with pytest.raises(sc.ScoreError, match="one length"):
        sc.ScoreEvents(name="x", source="", onset=np.zeros(2), duration=np.ones(3), pitch=np.zeros(2, int),
                       voice=np.zeros(2, int), tonic="C", mode="major", n_parts=4, tempo_qpm=90.0)


def test_score_text_follows_the_rendered_notes(train_dir):
    from fastjukebox.demo.score_text import GRID_SECONDS, cells_for, pitches_of_text, score_text
    _, pieces, _ = train_dir
    p = pieces[1]  # transposed and/or stretched: the text must follow the variant, not the score
    base, semis, speed = cp.parse_variant(p.name)
    ev = cp.variant_events(sc.load_score(next(q for q in sc.chorale_paths() if sc.piece_name(q) == base),
                                         FAST_TEMPO), p.name)
    assert p.score_text == score_text(ev, len(p.audio))
    grid = pitches_of_text(p.score_text)
    assert grid.shape == (cells_for(len(p.audio)), len(sc.VOICES))
    # every cell holds, per voice, the note sounding at the cell's centre
    cell = len(p.audio) / cp.SR / grid.shape[0]
    assert cell == pytest.approx(GRID_SECONDS, rel=0.02)
    for k in range(0, grid.shape[0], 7):
        t = (k + 0.5) * cell
        for v in range(len(sc.VOICES)):
            on = (ev.voice == v) & (ev.onset <= t) & (t < ev.onset + ev.duration)
            assert grid[k, v] == (ev.pitch[on].max() if on.any() else -1)
    assert (grid[-1] == -1).all()  # the reverb tail: rests
    tail = int(round((ev.duration_s) / cell)) + 1
    assert (grid[tail:] == -1).all() and (grid[: tail - 2] >= 0).mean() > 0.9


def test_score_text_survives_the_cache_and_is_added_to_older_records(train_dir, tmp_path, monkeypatch):
    import json
    import shutil
    root, pieces, _ = train_dir
    old = tmp_path / "cache"
    shutil.copytree(root, old)
    for rec in old.glob("*.json"):  # records as written before score texts
        meta = json.loads(rec.read_text())
        meta.pop("score_text", None)
        rec.write_text(json.dumps(meta))
    kw = dict(limit=2, cache_dir=old, progress=False, tempo_qpm=FAST_TEMPO, n_augment=1)
    report: dict = {}
    upgraded = cp.build_corpus("train", report=report, **kw)
    assert report["rendered"] == 0 and report["cached"] == 4          # no audio rendered again
    assert [p.score_text for p in upgraded] == [p.score_text for p in pieces]
    assert all(p.score_text for p in upgraded)

    def no_parsing(*a, **k):
        raise AssertionError("a cache hit with a score text must not parse the score")
    monkeypatch.setattr(sc, "load_score", no_parsing)
    again = cp.build_corpus("train", **kw)                             # the records now hold it
    assert [p.score_text for p in again] == [p.score_text for p in pieces]


def test_score_text_format_and_errors():
    from fastjukebox.demo import score_text as st
    ev = sc.ScoreEvents(name="x", source="", onset=np.array([0.0, 0.0, 0.5]), duration=np.array([1.0, 0.5, 0.5]),
                        pitch=np.array([69, 60, 200]), voice=np.array([0, 3, 3]), tonic="A", mode="minor",
                        n_parts=4, tempo_qpm=120.0)
    text = st.score_text(ev, int(1.5 * cp.SR))
    assert len(text) == 12 * 4 and len(text) / st.CHARS_PER_SECOND == pytest.approx(1.5)
    grid = st.pitches_of_text(text)
    assert grid[0].tolist() == [69, -1, -1, 60] and grid[5].tolist() == [69, -1, -1, st.LOWEST_PITCH + 61]
    assert (grid[8:] == -1).all()                                     # after the last note: rests
    assert st.crop_text(text, int(0.5 * cp.SR)) == text[:16]
    assert set(text) <= set(VOCAB_V2)                                 # usable as lyrics as it is
    with pytest.raises(ValueError, match="whole cells"):
        st.pitches_of_text("abc")
    with pytest.raises(ValueError, match="neither pitches nor rests"):
        st.pitches_of_text("ab c")
    with pytest.raises(ValueError, match="n_samples"):
        st.cells_for(0)
