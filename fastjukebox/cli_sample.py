"""Sampling commands of the ``fastjukebox`` command line.

* ``sample``: sample new audio (optionally continuing a ``--prompt`` audio file);
* ``upsample``: sample the lower levels from the top-level codes of a saved run (``--codes``), or
  of any audio (``--from-audio FILE``, or ``demo:<name>`` for a shipped held-out excerpt: encoded
  to top-level codes, then levels 1 and 0 sampled);
* ``continue``: extend the codes of a saved run to ``--seconds`` in total;
* ``encode`` / ``decode``: audio file <-> codes file with the VQ-VAE.

Every run that samples writes its audio (``OUT.wav`` or ``OUT.flac``; with several samples
``OUT_0.wav``, ``OUT_1.wav``, ...) and ``OUT.npz`` beside it, holding the codes of every level
present (``codes_level0`` .. ``codes_level2``, each an int64 array (N, T_level)) and ``settings``,
a JSON string with the run's labels and sampling settings. ``upsample`` and ``continue`` read such
a file (``--codes``); the labels they use default to those stored in it (artist, genre, lyrics, id
files, total and offset seconds), and options given on the command line take precedence. A demo
excerpt's labels come from its manifest the same way. ``--plot`` also writes ``OUT.png``: the
spectrograms of the input (where there is one) and of the output.

Sample ``i`` of a run draws from its own generator, seeded from ``--seed`` and ``i``
(``sample_seeds``), so ``sample``, ``upsample`` and ``continue`` give the same codes whether
``accelerate launch -m fastjukebox ...`` splits the samples over several processes or one process
samples them all (``cli_processes``).
"""
from __future__ import annotations

import argparse
import secrets
from pathlib import Path

import torch

from .atomic import check_target
from .cli_labels import label_kwargs, label_settings
from .cli_options import DTYPES, HelpFormatter, parse_dtype
from .cli_outputs import check_out, check_outputs, check_plot, decode_outputs, run_share
from .cli_processes import Processes, current
from .cli_values import (SamplerOptions, parse_genre, parse_label, parse_levels, parse_nonneg_float, parse_nonneg_int,
                         parse_positive_int, parse_sampler, parse_seconds, per_level_parser)
from .codes_file import CODES_KEY, read_codes, sample_count, write_codes
from .settings import DEFAULT_CHUNK_SIZE, DEFAULT_TEMPERATURE, SettingsError, check_device


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------

def _device(name: str | None, procs: Processes | None = None) -> str:
    if name is None:
        if procs is not None and procs.device is not None:
            return str(procs.device)
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return str(check_device(name))
    except SettingsError as e:
        raise ValueError(f"--device: {e}") from None


def _check_model_options(args) -> None:
    """``--model`` and ``--device`` named before anything is read."""
    if not str(args.model).strip():
        raise ValueError("--model is empty; give a model directory or a bundled name (e.g. demo)")
    _device(args.device)


def _load_model(args, procs: Processes | None = None):
    from .bundle import load
    return load(args.model, dtype=parse_dtype(args.dtype), device=_device(args.device, procs))


def _agreed_seed(args, procs: Processes) -> int:
    """``--seed``, else a random one; the main process's in every process."""
    return procs.agree(args.seed if args.seed is not None else secrets.randbelow(2**31))


def _sampling_kw(args, seed: int, rows: range, total: int) -> dict:
    """The sampling options as given; ``Jukebox`` resolves them (``settings.resolve_sampling``:
    the model's ``sampling.json`` for the knobs and levels left out) and the run's settings
    record what was used. ``--passes`` / ``--gamma`` go as the API's aliases of the sampler
    options of those names (``settings.SAMPLER_OPTION_ALIASES``), ``--sampler-opt`` as
    ``sampler_options``. ``rows``: the run's samples this process draws, each from its own seed
    (``sample_seeds.sample_seed``), of ``total`` in the run (``run_samples``: every process's
    samplers decide by the run's batch size, not by their share)."""
    from .sample_seeds import sample_seed
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, chunk_size=args.chunk_size,
                sampler=args.sampler, sampler_options=args.sampler_opt, passes=args.passes, gamma=args.gamma,
                max_batch_size=args.max_batch_size, run_samples=total, seed=seed,
                sample_seeds=[sample_seed(seed, i) for i in rows],
                progress=not args.quiet)


def _run_settings(command: str, args, labels: dict) -> dict:
    s = {"command": command, "model": str(args.model)}
    s.update(labels)
    return s


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------

def cmd_sample(args) -> int:
    _check_model_options(args)
    check_outputs(args, args.n_samples)
    check_plot(args)
    labels = label_settings(args)
    from .audio import load_audio
    if args.prompt is not None:
        load_audio(args.prompt, duration=0.01)  # fail early, before loading the model
    procs = current()
    seed = _agreed_seed(args, procs)

    def body(rows):
        jb = _load_model(args, procs)
        levels = args.levels if args.levels else tuple(sorted(jb.levels, reverse=True))
        sampling = jb.resolve_sampling(levels, _sampling_kw(args, seed, rows, args.n_samples))   # named errors before model work
        prompt = None if args.prompt is None else load_audio(args.prompt, sr=jb.sr, duration=args.seconds)
        result = None
        if rows:
            with torch.inference_mode():
                result = jb.sample(seconds=args.seconds, n_samples=len(rows), levels=levels, prompt=prompt,
                                   **label_kwargs(labels), **sampling)
        settings = _run_settings("sample", args, labels)
        settings.update(prompt=args.prompt, sampled_levels=list(levels))
        return jb, result, settings, None if prompt is None else (str(args.prompt), prompt)

    return run_share(args, procs, args.n_samples, body)


def _upsample_audio(args) -> int:
    """``upsample --from-audio``: a file or a shipped demo excerpt, encoded to top-level codes."""
    from .audio import load_audio
    from .demo.excerpts import excerpt_agreement, excerpt_audio, get_excerpt, is_excerpt_source
    src = args.from_audio
    excerpt = get_excerpt(src) if is_excerpt_source(src) else None
    if excerpt is None:
        load_audio(src, duration=0.01)  # fail early, before loading the model
    stored = {} if excerpt is None else {"artist": excerpt.artist, "genre": excerpt.genre,
                                         "total_seconds": excerpt.piece_seconds,
                                         "offset_seconds": excerpt.offset_seconds}
    labels = label_settings(args, stored)
    procs = current()
    seed = _agreed_seed(args, procs)
    agreement = {}

    def body(rows):
        jb = _load_model(args, procs)
        sampling = jb.resolve_sampling(jb.upsampler_levels, _sampling_kw(args, seed, rows, 1))   # before the encoding
        if excerpt is None:
            audio = load_audio(src, sr=jb.sr, duration=args.seconds)
        else:
            if jb.sr != 44100:
                raise ValueError(f"demo excerpts are at 44100 Hz; model '{args.model}' samples at {jb.sr} Hz")
            audio = excerpt_audio(excerpt)
            if args.seconds is not None:
                audio = audio[: int(round(args.seconds * jb.sr))]
        with torch.inference_mode():
            top = jb.vqvae.encode(jb.vqvae.whole_top_codes(audio, f"'{src}'"),
                                  levels=(jb.vqvae.config.levels - 1,))[-1]
            result = jb.upsample(top, **label_kwargs(labels), **sampling) if rows else None
        settings = _run_settings("upsample", args, labels)
        settings.update(source=src, source_seconds=top.shape[1] * jb.vqvae.hop_lengths[-1] / jb.sr,
                        sampled_levels=list(jb.upsampler_levels))
        if excerpt is not None and result is not None:
            agreement.update(excerpt_agreement(result.audio[0].float().cpu().numpy(), excerpt))
            settings.update(excerpt_piece=excerpt.piece, score_agreement=agreement)
        return jb, result, settings, (src, audio)

    code = run_share(args, procs, 1, body)
    if excerpt is not None and procs.is_main and code == 0:
        own, chance = agreement["own"], agreement["other_excerpts"]
        print(f"note agreement with {excerpt.piece}'s score: {own:.2f} (with the other excerpts' scores: "
              f"{chance:.2f})")
    return code


def cmd_upsample(args) -> int:
    _check_model_options(args)
    check_out(args.out)
    check_plot(args)
    if args.from_audio is not None:
        if args.codes is not None:
            raise ValueError("give either --codes or --from-audio, not both")
        check_outputs(args, 1)
        return _upsample_audio(args)
    if args.codes is None:
        raise ValueError("give --codes (a codes file of an earlier run) or --from-audio (an audio file or "
                         "demo:<excerpt>)")
    if args.seconds is not None:
        raise ValueError("--seconds goes with --from-audio; with --codes the codes file sets the length")
    codes, labels, procs, seed = _from_codes_file(args)

    def body(rows):
        jb = _load_model(args, procs)
        top = jb.vqvae.config.levels - 1
        if len(codes) <= top or codes[top] is None:
            present = [l for l, z in enumerate(codes) if z is not None]
            raise ValueError(f"codes file '{args.codes}' has no top-level codes ({CODES_KEY.format(top)}); "
                             f"it has level(s) {', '.join(map(str, present))}")
        sampling = jb.resolve_sampling(jb.upsampler_levels, _sampling_kw(args, seed, rows, sample_count(codes)))
        result = None
        if rows:
            with torch.inference_mode():
                result = jb.upsample(torch.from_numpy(codes[top][rows.start:rows.stop]), **label_kwargs(labels),
                                     **sampling)
        settings = _run_settings("upsample", args, labels)
        settings.update(parent=str(args.codes), sampled_levels=list(jb.upsampler_levels))
        return jb, result, settings, None

    return run_share(args, procs, sample_count(codes), body)


def _from_codes_file(args):
    """A run that starts from ``--codes``: the codes, the labels (stored ones unless given), this
    process's share and the seed all processes agreed on; outputs checked before any work."""
    codes, stored = read_codes(args.codes)
    check_outputs(args, sample_count(codes))
    labels = label_settings(args, stored)
    procs = current()
    return codes, labels, procs, _agreed_seed(args, procs)


def cmd_continue(args) -> int:
    _check_model_options(args)
    check_plot(args)
    codes, labels, procs, seed = _from_codes_file(args)

    def body(rows):
        jb = _load_model(args, procs)
        n = jb.vqvae.config.levels
        if len(codes) > n:
            raise ValueError(f"codes file '{args.codes}' has level-{len(codes) - 1} codes; this model has "
                             f"levels 0..{n - 1}")
        given = codes + [None] * (n - len(codes))
        levels = args.levels
        if levels is None:
            levels = tuple(l for l in range(n - 1, -1, -1) if given[l] is not None and l in jb.levels)
            if not levels:
                raise ValueError(f"this model has no prior for the levels in '{args.codes}'")
        sampling = jb.resolve_sampling(levels, _sampling_kw(args, seed, rows, sample_count(codes)))
        result = None
        if rows:
            with torch.inference_mode():
                result = jb.continue_([None if z is None else torch.from_numpy(z[rows.start:rows.stop]) for z in given],
                                      seconds=args.seconds, levels=levels, **label_kwargs(labels), **sampling)
        settings = _run_settings("continue", args, labels)
        settings.update(parent=str(args.codes), sampled_levels=list(levels))
        return jb, result, settings, None

    return run_share(args, procs, sample_count(codes), body)


def cmd_encode(args) -> int:
    from .audio import load_audio
    _check_model_options(args)
    if Path(args.out).suffix.lower() != ".npz":
        raise ValueError(f"--out {args.out!r}: the codes file must end in .npz")
    check_target(args.out, "--out")
    jb = _load_model(args)
    audio = load_audio(args.audio, sr=jb.sr, duration=args.seconds, offset=args.offset)
    audio = jb.vqvae.whole_top_codes(audio, f"'{args.audio}'")
    keep = audio.shape[1]
    with torch.inference_mode():
        codes = jb.vqvae.encode(audio)
    settings = {"command": "encode", "model": str(args.model), "source": str(args.audio), "sr": jb.sr,
                "offset": args.offset, "seconds": keep / jb.sr, "n_samples": 1,
                "levels_present": list(range(len(codes)))}
    print(write_codes(args.out, codes, settings))
    return 0


def cmd_decode(args) -> int:
    from .audio import save_audio
    _check_model_options(args)
    codes, _ = read_codes(args.codes)
    for p in decode_outputs(args, sample_count(codes)):
        check_target(p, "--out")
    present = [l for l, z in enumerate(codes) if z is not None]
    level = args.level if args.level is not None else min(present)
    if level >= len(codes) or codes[level] is None:
        raise ValueError(f"codes file '{args.codes}' has no level-{level} codes; it has level(s) "
                         f"{', '.join(map(str, present))}")
    jb = _load_model(args)
    with torch.inference_mode():
        audio = jb.vqvae.decode(torch.from_numpy(codes[level]), level).clamp(-1.0, 1.0)
    paths = save_audio(args.out, audio.float().cpu(), jb.sr)
    for p in paths if isinstance(paths, list) else [paths]:
        print(p)
    return 0


# --------------------------------------------------------------------------------------------
# parsers
# --------------------------------------------------------------------------------------------

def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory or bundled model name (e.g. tiny)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="compute in this dtype (default: as stored); float16/bfloat16 are for GPUs: on a CPU "
                        "they run 3 to 11 times slower than float32 (a warning says so)")


def _label_options(p: argparse.ArgumentParser, stored: bool) -> None:
    note = " (default: the codes file's, else %s)" if stored else " (default: %s)"
    p.add_argument("--artist", type=parse_label, help="artist id or name (names need the id files)" + note % "0")
    p.add_argument("--genre", type=parse_genre, help="genre id, ids '3,7', or name (names need the id files)"
                   + note % "0")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--lyrics", help="lyrics text" + note % "none")
    g.add_argument("--lyrics-file", help="read the lyrics from this utf-8 file (default: none)")
    p.add_argument("--artist-ids", help="original artist id file ('name;id' lines)" + note % "none")
    p.add_argument("--genre-ids", help="original genre id file ('name;id' lines)" + note % "none")
    p.add_argument("--ids-dir", help="directory with v2_/v3_artist_ids.txt and genre_ids.txt" + note % "none")
    p.add_argument("--total-seconds", type=parse_seconds,
                   help="length of the whole song for the labels" + note % "the sampled length")
    p.add_argument("--offset-seconds", type=parse_nonneg_float,
                   help="where the sampled audio starts in the song, for the labels" + note % "0")


def _sampler_options_text() -> str:
    """The registered samplers' options in words (extensions' included)."""
    from .plugins import load_plugins
    from .samplers import describe_options
    load_plugins()
    return describe_options().replace("%", "%%")   # argparse formats help with %


def _sampling_options(p: argparse.ArgumentParser) -> None:
    family = " (default: the model's sampling.json where it sets one, else %s)"
    p.add_argument("--temperature", metavar="T",
                   type=per_level_parser("temperature", float),
                   help="one value or per level, e.g. '2=0.98,1=0.99,0=0.99'; 0: greedy (the most likely code)"
                        + family % DEFAULT_TEMPERATURE)
    p.add_argument("--top-k", metavar="K", type=per_level_parser("top_k", int),
                   help="keep the K most likely codes; 0: all (one value or per level)" + family % "0")
    p.add_argument("--top-p", metavar="P",
                   type=per_level_parser("top_p", float),
                   help="nucleus sampling; 0: off (one value or per level)" + family % "0")
    p.add_argument("--sampler", type=parse_sampler,
                   help="sampler per level: 'ar' (exact), 'ar-graph' (exact, the same tokens through the "
                        "device-position step: CUDA graphs on CUDA), 'parallel' (distilled student; upsampler "
                        "levels only, so 'parallel' alone means '1=parallel,0=parallel') or 'speculative' (exact: "
                        "the student drafts, the prior verifies; upsampler levels only), or pairs like "
                        "'1=parallel,0=ar' (default: ar)")
    p.add_argument("--sampler-opt", metavar="NAME=VALUE", action=SamplerOptions,
                   help="an option of the chosen samplers, repeatable; one that none of them takes is an error. "
                        f"The samplers' options: {_sampler_options_text()}")
    p.add_argument("--passes", type=parse_positive_int,
                   help="decoding passes per window of the parallel sampler: --sampler-opt passes=N (default: the "
                        "sampler's)")
    p.add_argument("--gamma", type=parse_positive_int,
                   help="positions the prior verifies per call of the speculative sampler: --sampler-opt gamma=N "
                        "(default: the sampler's)")
    p.add_argument("--chunk-size", metavar="C", type=per_level_parser("chunk_size", int),
                   help=f"tokens primed per step (one value or per level; default: {DEFAULT_CHUNK_SIZE})")
    p.add_argument("--max-batch-size", type=parse_positive_int, default=16,
                   help="samples decoded together (default: 16)")
    p.add_argument("--seed", type=int, help="random seed (default: a random one, stored in the codes file)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress (on a terminal: bars; in a log: a line every 10 s per level) (default: "
                        "progress shown)")
    p.add_argument("--plot", action="store_true",
                   help="also write OUT.png: spectrograms of the input (if any) and the output (needs matplotlib; "
                        "default: no plot)")


def add_commands(sub) -> None:
    """Add ``sample``, ``upsample``, ``continue``, ``encode`` and ``decode`` to ``sub``."""
    p = sub.add_parser("sample", help="sample new audio; writes OUT.wav/.flac and OUT.npz (codes + settings)",
                       description=__doc__, formatter_class=HelpFormatter)
    _model_options(p)
    p.add_argument("--seconds", type=parse_seconds, default=10.0, help="length to sample, at most 3600 (default: 10)")
    p.add_argument("--n-samples", type=parse_positive_int, default=1, help="number of samples (default: 1)")
    _label_options(p, stored=False)
    _sampling_options(p)
    p.add_argument("--prompt", help="audio file to continue (encoded at every level; default: none)")
    p.add_argument("--levels", type=parse_levels, help="levels to sample, top first (default: all, e.g. 2,1,0)")
    p.add_argument("--out", default="sample.wav", help="audio file, .wav or .flac (default: sample.wav)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("upsample", help="sample the lower levels from the top-level codes of a codes file "
                                        "or of audio (--from-audio)",
                       description=__doc__, formatter_class=HelpFormatter)
    _model_options(p)
    p.add_argument("--codes", help="codes file (.npz) of an earlier run (default: none; give this or --from-audio)")
    p.add_argument("--from-audio", metavar="SRC",
                   help="audio file, or demo:<name> for a shipped held-out excerpt (demo:consort, demo:strings, "
                        "demo:winds, demo:organ, demo:brass): its top-level codes are upsampled (default: none)")
    p.add_argument("--seconds", type=parse_seconds,
                   help="with --from-audio: use at most this many seconds (default: all of it)")
    _label_options(p, stored=True)
    _sampling_options(p)
    p.add_argument("--out", default="upsampled.wav", help="audio file, .wav or .flac (default: upsampled.wav)")
    p.set_defaults(func=cmd_upsample)

    p = sub.add_parser("continue", help="extend the codes of a codes file to --seconds in total",
                       description=__doc__, formatter_class=HelpFormatter)
    _model_options(p)
    p.add_argument("--codes", required=True, help="codes file (.npz) of an earlier run")
    p.add_argument("--seconds", type=parse_seconds, required=True, help="total length after continuing, at most 3600")
    _label_options(p, stored=True)
    _sampling_options(p)
    p.add_argument("--levels", type=parse_levels, help="levels to sample, top first (default: the levels in the file)")
    p.add_argument("--out", default="continued.wav", help="audio file, .wav or .flac (default: continued.wav)")
    p.set_defaults(func=cmd_continue)

    p = sub.add_parser("encode", help="encode an audio file into codes at every level (.npz)",
                       formatter_class=HelpFormatter)
    _model_options(p)
    p.add_argument("audio", help="audio file (resampled to the model's rate, mixed down to mono)")
    p.add_argument("--seconds", type=parse_seconds, help="encode at most this many seconds (default: all of it)")
    p.add_argument("--offset", type=parse_nonneg_float, default=0.0, help="start this many seconds in (default: 0)")
    p.add_argument("--out", default="codes.npz", help="codes file (default: codes.npz)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decode one level of a codes file to audio", formatter_class=HelpFormatter)
    _model_options(p)
    p.add_argument("--codes", required=True, help="codes file (.npz)")
    p.add_argument("--level", type=parse_nonneg_int, help="level to decode (default: the lowest in the file)")
    p.add_argument("--out", default="decoded.wav", help="audio file, .wav or .flac (default: decoded.wav)")
    p.set_defaults(func=cmd_decode)
