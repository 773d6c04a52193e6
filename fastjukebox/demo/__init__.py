"""Demo corpus: Bach chorales from music21's bundled corpus, rendered offline to 44.1 kHz audio
with a small deterministic synthesizer (``scores`` -> ``synth`` -> ``corpus``)."""
