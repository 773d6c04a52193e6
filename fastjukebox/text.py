"""Lyric text processing: transliteration to ASCII and the character vocabularies.

Two vocabularies are in use by the released priors:

* ``v2`` (5b_lyrics): 80 symbols, id 0 = unknown, then
  ``A-Z a-z 0-9 . , : ; ! ? - + ' " ( ) [ ] <space> <tab> <newline>`` as ids 1..79;
* ``v3`` (1b_lyrics): the same without ``+`` (79 symbols).

Text is transliterated to ASCII before tokenising. The ``unidecode`` package is used when it is
installed; otherwise a built-in approximation (Unicode NFKD, combining marks dropped, plus a table
for the common letters and punctuation NFKD leaves alone) gives the same result for Latin-script
text. Characters outside the vocabulary are dropped.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Sequence

__all__ = ["TextProcessor", "VOCAB_V2", "VOCAB_V3", "normalise_version", "to_ascii",
           "fallback_to_ascii"]

VOCAB_V2 = ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
            ".,:;!?-+'\"()[] \t\n")
VOCAB_V3 = VOCAB_V2.replace("+", "")

# Characters that NFKD does not reduce to ASCII, with the transliteration unidecode gives them.
_TABLE: dict[str, str] = {
    # dashes and minus signs
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "--", "\u2015": "--",
    "\u2212": "-", "\u00ad": "-",
    # quotes, primes, accents used as apostrophes
    "\u2018": "'", "\u2019": "'", "\u201a": ",", "\u201b": "'", "\u201c": '"', "\u201d": '"',
    "\u201e": ",,", "\u201f": '"', "\u2032": "'", "\u2033": '"', "\u00b4": "'", "\u02bc": "'",
    "\u00ab": "<<", "\u00bb": ">>", "\u2039": "<", "\u203a": ">",
    # other punctuation
    "\u2026": "...", "\u00a1": "!", "\u00bf": "?", "\u00b7": "*", "\u2022": "*", "\u00d7": "x",
    "\u00f7": "/", "\u2044": "/",
    # letters without a decomposition
    "\u00df": "ss", "\u1e9e": "Ss", "\u00e6": "ae", "\u00c6": "AE", "\u00f8": "o", "\u00d8": "O",
    "\u0153": "oe", "\u0152": "OE", "\u0142": "l", "\u0141": "L", "\u0111": "d", "\u0110": "D",
    "\u00f0": "d", "\u00d0": "D", "\u00fe": "th", "\u00de": "Th", "\u0131": "i", "\u0127": "h",
    "\u0126": "H", "\u014b": "ng", "\u014a": "NG", "\u0138": "q", "\u0192": "f",
}


def fallback_to_ascii(text: str) -> str:
    """Transliterate ``text`` to ASCII without ``unidecode``.

    Each non-ASCII character is looked up in a small table, else decomposed with NFKD (combining
    marks dropped); whatever is still not ASCII is removed. Covers Latin-script text; other
    scripts are dropped rather than romanised.
    """
    out: list[str] = []
    for ch in text:
        if ch < "\x80":
            out.append(ch)
        elif ch in _TABLE:
            out.append(_TABLE[ch])
        else:
            for part in unicodedata.normalize("NFKD", ch):
                if part < "\x80":
                    out.append(part)
                elif not unicodedata.combining(part):
                    out.append(_TABLE.get(part, ""))
    return "".join(out)


def _pick_to_ascii() -> Callable[[str], str]:
    try:
        from unidecode import unidecode  # optional dependency
    except ImportError:
        return fallback_to_ascii
    return unidecode


to_ascii: Callable[[str], str] = _pick_to_ascii()


def normalise_version(version: str | int) -> str:
    """Return ``"v2"`` or ``"v3"`` for a vocabulary/label version given as "v2", "v3", 2 or 3."""
    v = str(version).lower().lstrip("v")
    if v not in ("2", "3"):
        raise ValueError(f"unknown label/lyrics version {version!r}; expected 'v2' or 'v3'")
    return "v" + v


class TextProcessor:
    """Lyric cleaner and character tokeniser for vocabulary ``v2`` (80 ids) or ``v3`` (79 ids)."""

    def __init__(self, version: str | int = "v2",
                 transliterate: Callable[[str], str] | None = None):
        """``transliterate`` overrides the ASCII conversion (default: unidecode if installed)."""
        self.version = normalise_version(version)
        self.chars = VOCAB_V3 if self.version == "v3" else VOCAB_V2
        self.vocab: dict[str, int] = {c: i + 1 for i, c in enumerate(self.chars)}
        self.n_vocab = len(self.chars) + 1
        self._transliterate = transliterate or to_ascii

    def clean(self, text: str) -> str:
        """ASCII-transliterate, turn backslashes into newlines and drop out-of-vocabulary chars."""
        text = self._transliterate(text).replace("\\", "\n")
        return "".join(c for c in text if c in self.vocab)

    def tokenise(self, text: str) -> list[int]:
        """Ids of the characters of an already cleaned ``text`` (KeyError on unknown chars)."""
        return [self.vocab[c] for c in text]

    def encode(self, text: str) -> list[int]:
        """``tokenise(clean(text))``."""
        return self.tokenise(self.clean(text))

    def textise(self, tokens: Iterable[int]) -> str:
        """Text of a token sequence; id 0 (unknown / padding) becomes the empty string."""
        out = []
        for tok in tokens:
            tok = int(tok)
            if tok == 0:
                continue
            if not 0 < tok < self.n_vocab:
                raise ValueError(f"token {tok} outside the {self.version} vocabulary "
                                 f"(0..{self.n_vocab - 1})")
            out.append(self.chars[tok - 1])
        return "".join(out)

    def characterise(self, tokens: Sequence[int]) -> list[str]:
        """Per-token characters (``''`` for id 0), one entry per token."""
        return [self.textise([t]) for t in tokens]

    def __repr__(self) -> str:
        return f"TextProcessor({self.version!r}, n_vocab={self.n_vocab})"
