"""The README's main command: a shipped held-out excerpt upsampled by the demo family."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fastjukebox.cli import main
from fastjukebox.demo.corpus import ARTISTS, is_heldout
from fastjukebox.demo.excerpts import (EXCERPT_SECONDS, EXCERPTS_DIR, MANIFEST_NAME, excerpt_audio, get_excerpt,
                                       read_manifest)
from fastjukebox.demo.score_text import cells_for
from fastjukebox.demo.scores import VOICES

SR = 44100


def _settings(path) -> dict:
    with np.load(path) as f:
        return json.loads(str(f["settings"]))


def test_shipped_excerpts_are_held_out_one_per_instrument_set():
    excerpts = read_manifest()
    assert [e.name for e in excerpts] == ARTISTS
    for e in excerpts:
        assert is_heldout(e.piece), e.piece
        assert e.artist == ARTISTS.index(e.name) and e.genre in (0, 1)
        audio = excerpt_audio(e)
        assert audio.shape == (int(EXCERPT_SECONDS * SR),) and 0.05 < float(audio.abs().max()) <= 1.0
        assert len(e.score_text) == cells_for(len(audio)) * len(VOICES)
        assert e.piece_seconds > e.seconds
    assert sum(e.path().stat().st_size for e in excerpts) < 4 * 2**20


def test_excerpt_is_the_rendered_held_out_piece(tmp_path):
    """Rendering the piece again gives the excerpt's samples and score text exactly."""
    from fastjukebox.demo.corpus import build_corpus
    piece = build_corpus("heldout", augment=False, limit=1, cache_dir=tmp_path, progress=False)[0]
    e = get_excerpt(f"demo:{piece.name}")
    audio = excerpt_audio(e).numpy()
    n = len(audio)
    np.testing.assert_array_equal(np.round(audio * 32768).astype(np.int16), piece.audio[:n])
    assert piece.score_text.startswith(e.score_text)


def test_unknown_and_corrupt_excerpts_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown demo excerpt 'demo:piano'.*demo:strings"):
        get_excerpt("demo:piano")
    d = tmp_path / "excerpts"
    shutil.copytree(EXCERPTS_DIR, d)
    e = get_excerpt("organ", d)
    raw = bytearray(e.path(d).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    e.path(d).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="organ.*corrupt"):
        excerpt_audio(e, d)
    (d / MANIFEST_NAME).write_text("[{\"name\": 1}]")
    with pytest.raises(ValueError, match="not an excerpt manifest"):
        read_manifest(d)


def test_upsample_from_excerpt_plays_its_score(tmp_path, capsys):
    """The main command's code path on 2 s of an excerpt: audio, codes, plot, and notes kept."""
    out = tmp_path / "up.wav"
    rc = main(["upsample", "--model", "demo", "--from-audio", "demo:strings", "--seconds", "2",
               "--sampler", "parallel", "--seed", "0", "--plot", "--quiet", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    import soundfile as sf
    audio, sr = sf.read(out)
    assert sr == SR and abs(len(audio) - 2 * SR) < 128 and np.abs(audio).max() > 0.05
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = _settings(out.with_suffix(".npz"))
    e = get_excerpt("demo:strings")
    assert s["source"] == "demo:strings" and s["excerpt_piece"] == e.piece
    assert s["sampler"] == {"1": "parallel", "0": "parallel"}
    assert (s["artist"], s["genre"], s["total_seconds"]) == (e.artist, e.genre, e.piece_seconds)
    agree = s["score_agreement"]
    assert agree["own"] >= 0.6 and agree["own"] > agree["other_excerpts"] + 0.2, agree
    assert f"note agreement with {e.piece}'s score: {agree['own']:.2f}" in stdout


def test_upsample_from_an_audio_file(tmp_path, capsys):
    """Any audio file: encoded to top-level codes, the lower levels sampled; labels as given."""
    import soundfile as sf
    src = tmp_path / "in.wav"
    sf.write(src, excerpt_audio(get_excerpt("brass")).numpy()[: SR], SR)
    out = tmp_path / "o.wav"
    rc = main(["upsample", "--model", "demo", "--from-audio", str(src), "--artist", "4", "--seed", "1",
               "--quiet", "--out", str(out)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    s = _settings(out.with_suffix(".npz"))
    assert s["source"] == str(src) and s["artist"] == 4 and "score_agreement" not in s
    with np.load(out.with_suffix(".npz")) as f:
        assert f["codes_level2"].shape == (1, SR // 128) and f["codes_level0"].shape == (1, SR // 128 * 16)


@pytest.mark.parametrize("argv, message", [
    (["--from-audio", "demo:piano"], "unknown demo excerpt"),
    (["--from-audio", "demo:organ", "--codes", "x.npz"], "either --codes or --from-audio"),
    ([], "give --codes"),
    (["--codes", "x.npz", "--seconds", "2"], "--seconds goes with --from-audio"),
    (["--from-audio", "demo:organ", "--seconds", "0.3"], "too short for the level-1 upsampler"),
    (["--from-audio", "missing.wav"], "missing.wav"),
])
def test_upsample_bad_input_is_named(tmp_path, capsys, argv, message):
    rc = main(["upsample", "--model", "demo", "--quiet", "--out", str(tmp_path / "o.wav"), *argv])
    _, err = capsys.readouterr()
    assert rc == 2 and message in err, err
