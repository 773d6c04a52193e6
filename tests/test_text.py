import json
import os
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from fastjukebox.text import (VOCAB_V2, VOCAB_V3, TextProcessor, fallback_to_ascii,
                              normalise_version)

DATA = Path(__file__).parent / "data"
TINY = ["lyrics_tiny_prior_1b_lyrics", "lyrics_tiny_prior_5b_lyrics"]


@lru_cache(maxsize=None)
def windows() -> dict:
    return json.loads((DATA / "windows.json").read_text(encoding="utf-8"))


def test_vocab_sizes_and_ids():
    v2, v3 = TextProcessor("v2"), TextProcessor("v3")
    assert (v2.n_vocab, v3.n_vocab) == (80, 79)
    assert len(VOCAB_V2) == 79 and len(VOCAB_V3) == 78 and "+" not in VOCAB_V3
    assert v2.tokenise("Aa0 +\n") == [1, 27, 53, 77, 70, 79]
    assert v3.tokenise("Aa0 \t\n") == [1, 27, 53, 76, 77, 78]
    assert v3.clean("1+2") == "12" and v2.clean("1+2") == "1+2"


@pytest.mark.parametrize("key", TINY)
@pytest.mark.parametrize("fallback", [False, True])
def test_clean_and_tokenise_fixture(key, fallback):
    fx = windows()[key]
    tp = TextProcessor(fx["text_processor"], transliterate=fallback_to_ascii if fallback else None)
    assert tp.n_vocab == fx["n_vocab"]
    for meta, cleaned, full in zip(fx["metas"], fx["cleaned_lyrics"], fx["full_tokens"]):
        assert tp.clean(meta["lyrics"]) == cleaned
        assert tp.tokenise(cleaned) == full
        assert tp.encode(meta["lyrics"]) == full
        assert tp.textise(full) == cleaned


@pytest.mark.parametrize("name", ["prior_1b_lyrics", "prior_5b_lyrics"])
def test_real_size_full_tokens(name):
    fx = windows()["lyrics_real_size"][name]
    tp = TextProcessor("v3" if fx["v3"] else "v2", transliterate=fallback_to_ascii)
    for meta, full in zip(fx["metas"], fx["full_tokens"]):
        assert tp.encode(meta["lyrics"]) == full


def test_fallback_table():
    assert fallback_to_ascii("Straße — Æsir… “ok” ‘no’ – Øl, łódź, œuvre") == \
        "Strasse -- AEsir... \"ok\" 'no' - Ol, lodz, oeuvre"
    assert fallback_to_ascii("naïve café ﬁne") == "naive cafe fine"
    assert fallback_to_ascii("日本") == ""  # unknown scripts are dropped, not kept


def test_clean_backslash_and_drops():
    tp = TextProcessor("v2")
    assert tp.clean("a\\b & c*d {e}") == "a\nb  cd e"


def test_textise_padding_and_range():
    tp = TextProcessor("v3")
    assert tp.textise([0, 0, 8, 47, 39]) == "Hum"
    assert tp.characterise([0, 1]) == ["", "A"]
    with pytest.raises(ValueError, match="outside"):
        tp.textise([79])


def test_version_names():
    assert normalise_version(3) == "v3" and normalise_version("V2") == "v2"
    with pytest.raises(ValueError, match="version"):
        TextProcessor("v4")
