"""``python -m fastjukebox.demo report``: regenerate ``docs/demo_quality.md`` and its figures.

Measures the shipped demo family on held-out chorales (never seen in training):

* VQ-VAE reconstruction per level: relative multi-resolution STFT distance and SNR, against
  trivial baselines (silence, the input low-passed at 1 kHz and 4 kHz), and codebook usage;
* held-out NLL (bits/token) of each prior against the add-one smoothed unigram of the train
  codes, on the codes shipped in ``eval_codes.npz``;
* tonality (``evaluate.tonal_fraction``: the share of energy in spectral peaks, pitched sound
  against noise) of held-out audio, its reconstructions, levels 1 and 0 sampled from the real
  top-level codes, and samples through all three levels (with the family's ``sampling.json`` and,
  where it has one, with the built-in settings);
* notes (``evaluate.score_agreement``): how closely the same audio plays its chorale's score,
  against the other held-out scores as the chance level;
* the main command (``fastjukebox upsample --from-audio demo:<name>``) on each shipped held-out
  excerpt: how closely the upsampled audio plays the excerpt's score, and its sampling time;
* spectrograms of a held-out piece, its reconstruction at every level, and a short sample.

Runs in a few minutes on one CPU core (the sample dominates).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..plots import spectrogram_figure
from ..sampling_defaults import BUILTIN
from .evaluate import (REQUIRED_MARGIN_BITS, chroma_agreement, chroma_per_cell, heldout_nll, load_eval_codes,
                       lowpass, relative_stft_distance, score_pitch_classes, tonal_fraction, unigram_bits)

__all__ = ["write_report", "reconstruction_table", "nll_table", "tonality_table", "score_table",
           "excerpt_table", "upsample_real_top"]

EVAL_SECONDS = 8.0
SAMPLE_SECONDS = 3.0
N_SAMPLES = 8                # samples drawn at once (one batch) for the tonality table
LOWPASS_HZ = (1000.0, 4000.0)


def _model_dir(model: str) -> Path:
    from ..bundle import ASSETS
    p = Path(model)
    return p if p.is_dir() else ASSETS / model


def _snr_db(target: torch.Tensor, pred: torch.Tensor) -> float:
    err = float((pred - target).pow(2).mean())
    return 10 * np.log10(float(target.pow(2).mean()) / max(err, 1e-20))


@torch.no_grad()
def reconstruction_table(vqvae, audio: torch.Tensor) -> dict:
    """audio (N, T) -> ``{"levels": [{level, hop, stft, snr_db}], "baselines": {name: {stft, snr_db}},
    "recon": [(N, T) per level]}``."""
    hop = vqvae.hop_lengths[-1]
    audio = audio[:, : audio.shape[1] // hop * hop]
    codes = vqvae.encode(audio)
    rows, recon = [], []
    for l, z in enumerate(codes):
        y = vqvae.decode(z, l)[:, : audio.shape[1]].clamp(-1, 1)
        recon.append(y)
        rows.append({"level": l, "hop": vqvae.hop_lengths[l], "stft": float(relative_stft_distance(audio, y).mean()),
                     "snr_db": _snr_db(audio, y)})
    base = {"silence": torch.zeros_like(audio)}
    for hz in LOWPASS_HZ:
        base[f"input low-passed at {hz / 1000:g} kHz"] = lowpass(audio, hz)
    baselines = {k: {"stft": float(relative_stft_distance(audio, y).mean()),
                     "snr_db": _snr_db(audio, y) if k != "silence" else 0.0} for k, y in base.items()}
    return {"levels": rows, "baselines": baselines, "recon": recon, "audio": audio}


def nll_table(jb, model_dir: Path) -> list[dict]:
    """Per prior (top first): held-out bits/token, unigram bits/token, margin, tokens."""
    pieces, counts = load_eval_codes(model_dir)
    rows = []
    for level in sorted(jb.levels, reverse=True):
        prior = jb.prior(level)
        r = heldout_nll(prior, pieces)
        u = unigram_bits(counts, pieces, level, prior.config.n_ctx)
        rows.append({"level": level, "n_ctx": prior.config.n_ctx, "nll": r["bits"], "unigram": u,
                     "margin": u - r["bits"], "tokens": r["tokens"], "pieces": len(pieces)})
    return rows


def upsample_real_top(jb, rec: dict, piece, seconds: float, seed: int = 0) -> torch.Tensor:
    """(1, T) audio: the levels below the top sampled from the real top-level codes of the first
    ``seconds`` of ``rec``'s first held-out clip (``piece``: its corpus piece, for the labels)."""
    hop = jb.vqvae.hop_lengths[-1]
    n = int(seconds * jb.sr) // hop * hop
    top = jb.vqvae.encode(rec["audio"][:1, :n])[-1]
    return jb.upsample(top, artist=piece.artist, genre=piece.genre, total_seconds=len(piece.audio) / jb.sr,
                       seed=seed, progress=False).audio


def _pipeline(rec: dict, held, samples: torch.Tensor, upsampled: torch.Tensor) -> list[tuple]:
    """``(key, what, clips, owners)`` along the pipeline, shared by the tonality and note tables;
    ``owners[i]`` is the held-out piece clip ``i`` comes from (None for samples)."""
    everyone = list(range(len(held)))
    return ([("audio", "held-out audio", rec["audio"], everyone)]
            + [(f"recon_{r['level']}", f"VQ-VAE reconstruction from level {r['level']} codes", y, everyone)
               for r, y in zip(rec["levels"], rec["recon"])]
            + [("upsampled", f"levels 1 and 0 sampled from the real top-level codes ({held[0].name})", upsampled, [0]),
               ("samples", "samples through all three levels", samples, [None] * len(samples))])


def tonality_table(rec: dict, held, samples: torch.Tensor, upsampled: torch.Tensor, seed: int = 0,
                   builtin_samples: torch.Tensor | None = None) -> list[dict]:
    """Rows ``{key, what, tonal (mean), values}``: where along the pipeline pitched sound turns to
    noise. Keys: ``audio``, ``recon_<level>``, ``upsampled`` (levels below the top sampled from the
    real top-level codes), ``samples``, ``samples_builtin`` (when given), ``noise``.

    rec: ``reconstruction_table``'s result; samples: (N, T) audio sampled through all levels with
    the family's sampling settings; upsampled: ``upsample_real_top``'s audio; builtin_samples: the
    samples with the built-in settings."""
    def row(key: str, what: str, clips) -> dict:
        values = [tonal_fraction(a) for a in clips]
        return {"key": key, "what": what, "values": values, "tonal": float(np.mean(values))}

    rows = [row(key, what, clips) for key, what, clips, _ in _pipeline(rec, held, samples, upsampled)]
    if builtin_samples is not None:
        rows.append(row("samples_builtin", "samples through all three levels, built-in settings (temperature "
                        f"{BUILTIN['temperature']} at every level)", builtin_samples))
    noise = torch.randn(upsampled.shape[-1], generator=torch.Generator().manual_seed(seed))
    rows.append(row("noise", "baseline: white noise", [noise]))
    return rows


def score_table(rec: dict, held, samples: torch.Tensor, upsampled: torch.Tensor) -> list[dict]:
    """Rows ``{key, what, own, other}``: how closely audio along the pipeline plays the notes of
    its score (``evaluate.score_agreement`` with the piece's own score text) against the scores of
    the other held-out pieces (the chance level). Samples have no score of their own (``own``
    None): they are compared with every held-out score."""
    from .score_text import GRID_SECONDS
    scores = [score_pitch_classes(p.score_text) for p in held]
    rows = []
    for key, what, clips, owners in _pipeline(rec, held, samples, upsampled):
        own, other = [], []
        for a, i in zip(clips, owners):
            chroma = chroma_per_cell(np.asarray(a, dtype=np.float32), GRID_SECONDS)
            if i is not None:
                own.append(chroma_agreement(chroma, scores[i]))
            other += [chroma_agreement(chroma, s) for j, s in enumerate(scores) if j != i]
        rows.append({"key": key, "what": what, "own": float(np.mean(own)) if own else None,
                     "other": float(np.mean(other))})
    return rows


MAIN_COMMAND_SAMPLER = "parallel"   # the README's main command: the students with their own settings


def excerpt_table(jb, seed: int = 0, sampler: str = MAIN_COMMAND_SAMPLER, progress: bool = False) -> list[dict]:
    """Per shipped excerpt, what the main command does (``upsample_excerpt`` with ``sampler``, seed
    ``seed``, the family's and students' own settings): rows ``{name, piece, seconds, own, other, wall}``."""
    from .excerpts import excerpt_agreement, read_manifest, upsample_excerpt
    rows = []
    for e in read_manifest():
        t0 = time.perf_counter()
        out = upsample_excerpt(jb, e, seed=seed, sampler=sampler, progress=progress)
        wall = time.perf_counter() - t0
        agree = excerpt_agreement(out.audio[0].numpy(), e)
        rows.append({"name": e.name, "piece": e.piece, "seconds": e.seconds, "own": agree["own"],
                     "other": agree["other_excerpts"], "wall": wall})
    return rows


def write_report(model: str = "demo", out: str = "docs/demo_quality.md", cache_dir=None,
                 progress: bool = True, sample_seconds: float = SAMPLE_SECONDS) -> Path:
    import fastjukebox as fj
    from ..train import codebook_usage
    from .corpus import ARTISTS, GENRES, build_corpus

    t0 = time.perf_counter()
    mdir = _model_dir(model)
    info = json.loads((mdir / "build_info.json").read_text()) if (mdir / "build_info.json").exists() else {}
    jb = fj.load(str(mdir) if Path(model).is_dir() else model)
    out = Path(out)
    fig_dir = out.parent / out.stem
    fig_dir.mkdir(parents=True, exist_ok=True)
    n_held = int(info.get("plan", {}).get("heldout_chorales", 6))
    held = build_corpus("heldout", augment=False, limit=n_held, cache_dir=cache_dir, progress=progress)
    n = min(int(EVAL_SECONDS * jb.sr), min(len(p.audio) for p in held))
    audio = torch.from_numpy(np.stack([np.asarray(p.audio[:n], dtype=np.float32) / 32768.0 for p in held]))
    rec = reconstruction_table(jb.vqvae, audio)
    usage = codebook_usage(jb.vqvae, rec["audio"])
    nll = nll_table(jb, mdir)

    t_s = time.perf_counter()
    sample = jb.sample(artist=held[0].artist, genre=held[0].genre, seconds=sample_seconds, seed=0,
                       n_samples=N_SAMPLES, progress=progress)
    sample_wall = time.perf_counter() - t_s
    builtin = None
    if jb.sampling_defaults.overrides:
        builtin = jb.sample(artist=held[0].artist, genre=held[0].genre, seconds=sample_seconds, seed=0,
                            n_samples=N_SAMPLES, progress=progress, **BUILTIN).audio
    upsampled = upsample_real_top(jb, rec, held[0], sample_seconds)
    tonal = tonality_table(rec, held, sample.audio, upsampled, builtin_samples=builtin)
    score = score_table(rec, held, sample.audio, upsampled)
    excerpts = excerpt_table(jb, progress=progress)
    settings = json.dumps(jb.sampling_defaults.to_json()) if jb.sampling_defaults.overrides else "none"
    sr = jb.sr
    show = int(4.0 * sr)
    sigs = [(f"held-out {held[0].name} ({GENRES[held[0].genre]}, {ARTISTS[held[0].artist]})",
             rec["audio"][0, :show].numpy())]
    sigs += [(f"VQ-VAE reconstruction from level {r['level']} codes (hop {r['hop']})", y[0, :show].numpy())
             for r, y in zip(rec["levels"], rec["recon"])]
    spectrogram_figure(sigs, fig_dir / "reconstruction.png", sr)
    spectrogram_figure([(f"sample, {sample_seconds:g} s, all three levels (seed 0, {GENRES[held[0].genre]}, "
                          f"{ARTISTS[held[0].artist]})", sample.audio[0].numpy())], fig_dir / "sample.png", sr)
    peak, rms = float(sample.audio[0].abs().max()), float(sample.audio[0].pow(2).mean().sqrt())

    md = _markdown(info, rec, usage, nll, tonal, score, excerpts, held, n / sr, sample_seconds, sample_wall, peak, rms, settings,
                   fig_dir.name, time.perf_counter() - t0)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(md)
    return out


def _fmt_s(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def _markdown(info, rec, usage, nll, tonal, score, excerpts, held, eval_s, sample_s, sample_wall, peak, rms, settings, figs,
              wall) -> str:
    L = ["# Demo model family: quality report", "",
         "Generated by `python -m fastjukebox.demo report` from the bundled `demo` family "
         "(`fastjukebox/assets/demo/`); "
         "numbers below are measured, not copied. The family is deliberately small and trained for "
         "minutes on a CPU: it models the demo corpus (synthesized Bach chorales) coarsely.", "",
         "## Build", ""]
    if info:
        st = info.get("stage_seconds", {})
        L += [f"Command: `{info.get('command')}`", "",
              f"Measured wall time: **{_fmt_s(info.get('total_seconds', 0))}** in total on "
              f"{info.get('machine', {}).get('cpu_count')} CPU cores "
              f"(torch {info.get('torch_version')}, OMP_NUM_THREADS={info.get('machine', {}).get('omp_num_threads')}).",
              "",
              "| stage | wall | detail |", "|---|---:|---|"]
        for k, v in st.items():
            d = info.get("stages", {}).get(k, {})
            detail = ", ".join(f"{a}={b:.3g}" if isinstance(b, float) else f"{a}={b}"
                               for a, b in (d.items() if isinstance(d, dict) else []))
            L.append(f"| {k} | {_fmt_s(v)} | {detail} |")
        L += ["", f"Steps: {json.dumps(info.get('steps'))}; seed {info.get('plan', {}).get('seed')}.", ""]
    else:
        L += ["(no build_info.json found beside the models)", ""]
    L += ["## VQ-VAE reconstruction (held-out)", "",
          f"{len(held)} held-out chorales, first {eval_s:.1f} s each. *STFT distance*: relative "
          "multi-resolution STFT magnitude distance, mean over the three training resolutions of "
          "||S(x) - S(y)|| / ||S(x)|| (0 is perfect; silence scores 1).", "",
          "| reconstruction | hop (samples) | STFT distance | SNR (dB) | codes used / 256 | code perplexity |",
          "|---|---:|---:|---:|---:|---:|"]
    for r, u in zip(rec["levels"], usage):
        L.append(f"| level {r['level']} | {r['hop']} | {r['stft']:.3f} | {r['snr_db']:.1f} | {u['used']} | "
                 f"{u['perplexity']:.1f} |")
    for k, b in rec["baselines"].items():
        L.append(f"| baseline: {k} | | {b['stft']:.3f} | {b['snr_db']:.1f} | | |")
    L += ["", "## Held-out NLL of the priors", "",
          "Bits per token on consecutive whole windows of the held-out codes shipped in "
          "`eval_codes.npz` (labels and upper-level codes as in training), against a unigram "
          "distribution (add-one smoothing) fitted on all train codes of the same level. "
          f"`tests/test_demo.py` requires every prior to beat the unigram by at least "
          f"**{REQUIRED_MARGIN_BITS} bits/token**.", "",
          "| prior | n_ctx | tokens | held-out NLL | unigram | margin |", "|---|---:|---:|---:|---:|---:|"]
    for r in nll:
        L.append(f"| level {r['level']} | {r['n_ctx']} | {r['tokens']} | {r['nll']:.3f} | {r['unigram']:.3f} | "
                 f"{r['margin']:+.3f} |")
    L += ["", "## Tonality: pitched sound or noise", "",
          "`fastjukebox.demo.evaluate.tonal_fraction`: the share of spectral energy below 4 kHz that "
          "lies in peaks at least 10 dB above the median of the 25 bins around them (sustained notes "
          "are narrow harmonic lines; noise is flat). 1 is all lines, 0 all noise. Each row is the "
          f"mean over the clips listed ({sample_s:g} s each for sampled audio; seed 0, the family's "
          f"sampling settings (`sampling.json`: {settings}) unless the row says otherwise). The rows "
          "follow the pipeline: how much tonality each stage keeps.", "",
          "| audio | tonal fraction | per clip |", "|---|---:|---|"]
    for r in tonal:
        L.append(f"| {r['what']} | {r['tonal']:.3f} | {', '.join(f'{v:.2f}' for v in r['values'])} |")
    by = {r["key"]: r["tonal"] for r in tonal}
    top_rec = by[f"recon_{len(rec['levels']) - 1}"]
    up, full = by["upsampled"], by["samples"]
    L += ["", f"Given real top-level codes, the upsamplers' output scores {up:.2f} (the top level's "
          f"reconstruction: {top_rec:.2f}); with the top level sampled as well, samples score {full:.2f}."]
    L += ["", "## Notes: does the audio play the score", "",
          "`fastjukebox.demo.evaluate.score_agreement`: per 0.125 s of audio, the cosine between the "
          "audio's pitch-class energy (60 Hz - 2 kHz) and the pitch classes its score sounds there "
          "(`fastjukebox.demo.score_text`), averaged. Overtones keep even the rendered score below 1; "
          "the same audio against the other held-out chorales' scores gives the chance level.", "",
          "| audio | its own score | other pieces' scores |", "|---|---:|---:|"]
    for r in score:
        own = "(none)" if r["own"] is None else f"{r['own']:.3f}"
        L.append(f"| {r['what']} | {own} | {r['other']:.3f} |")
    sc_by = {r["key"]: r for r in score}
    L += ["", f"Given the real top-level codes the upsamplers play the piece's notes "
          f"({sc_by['upsampled']['own']:.2f} against {sc_by['upsampled']['other']:.2f} by chance); the "
          "notes of a sample come from the top prior, which holds a chord rather than moving from chord "
          "to chord as a chorale does (spectrogram below)."]
    L += ["", "## The main command: upsampling the shipped excerpts", "",
          f"`fastjukebox upsample --model demo --from-audio demo:<name> --sampler {MAIN_COMMAND_SAMPLER} "
          "--seed 0` on each held-out excerpt (`fastjukebox/assets/demo/excerpts/`, never used in training): "
          "encoded to top-level codes, levels 1 and 0 sampled by the distilled students with their own "
          "settings (`student_level_{1,0}/sampling.json`). Agreement as above; "
          "the chance level is the same audio against the other excerpts' scores. Sampling time is wall "
          "time on this machine, one CPU thread.", "",
          "| excerpt | piece | seconds | its own score | other excerpts' scores | sampling (s) |",
          "|---|---|---:|---:|---:|---:|"]
    for r in excerpts:
        L.append(f"| `demo:{r['name']}` | {r['piece']} | {r['seconds']:g} | {r['own']:.3f} | {r['other']:.3f} "
                 f"| {r['wall']:.1f} |")
    L += ["", "## Spectrograms", "",
          f"![held-out piece and reconstructions]({figs}/reconstruction.png)", "",
          f"{N_SAMPLES} samples of {sample_s:g} s through all three levels in one batch (seed 0, the "
          f"family's sampling settings) took {sample_wall:.0f} s on one CPU thread; the first is shown "
          f"(peak {peak:.3f}, RMS {rms:.4f}).", "",
          f"![sample]({figs}/sample.png)", "",
          f"Report generated in {wall:.0f} s.", ""]
    return "\n".join(L)
