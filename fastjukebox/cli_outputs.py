"""What a sampling command writes: its audio (``OUT.wav`` or ``OUT.flac``; with several samples
``OUT_0.wav``, ``OUT_1.wav``, ...), its codes file ``OUT.npz`` (``codes_file``) and, with ``--plot``,
``OUT.png``: the spectrograms of the input (where there is one) and of the output.

Every file is checked to be writable before any work, and a run in one process writes them as a
set (all or none). Across processes (``cli_processes``) every process writes the audio of its
samples, named by their index in the run; the main process gathers the codes and writes the codes
file and the plot, and when a process fails no codes file is written.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_paths, check_target
from .cli_processes import Processes
from .codes_file import codes_settings, jsonable, write_codes


def check_out(out: str) -> Path:
    from .audio import SUPPORTED_SUFFIXES
    path = Path(out)
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(f"--out {out!r}: the audio file must end in "
                         f"{' or '.join(SUPPORTED_SUFFIXES)}")
    return path


def check_outputs(args, n: int) -> list[Path]:
    """The files a sampling command writes for ``n`` samples (audio, codes file, ``--plot``'s
    PNG), each checked to be writable before any work (``atomic.check_target``)."""
    from .audio import audio_paths
    out = check_out(args.out)
    paths = audio_paths(out, n) + [out.with_suffix(".npz")]
    if getattr(args, "plot", False):
        paths.append(out.with_suffix(".png"))
    for p in paths:
        check_target(p, "--out" if p == out else "output")
    return paths


def decode_outputs(args, n: int) -> list[Path]:
    from .audio import audio_paths
    return audio_paths(check_out(args.out), n)


def check_plot(args) -> None:
    if getattr(args, "plot", False):
        from .plots import require_matplotlib
        require_matplotlib("--plot")


def _plot(args, result, source: tuple[str, torch.Tensor] | None, path: Path) -> Path:
    from .plots import spectrogram_figure
    rows = [] if source is None else [(f"input: {source[0]}", source[1].float().cpu().numpy())]
    n = int(result.audio.shape[0])
    for i in range(min(n, 4)):
        rows.append((f"output{f' {i}' if n > 1 else ''}: {Path(args.out).name}", result.audio[i].float().cpu().numpy()))
    return spectrogram_figure(rows, path, result.sr)


def _write(args, jb, result, settings: dict, source: tuple[str, torch.Tensor] | None = None) -> int:
    """Audio, codes file and (``--plot``) spectrograms, written as a set (all or none);
    ``source``: (title, audio) of the input. ``settings``: the command's, then the run's as used."""
    from .audio import save_audio
    n = int(result.audio.shape[0])
    paths = check_outputs(args, n)
    settings = codes_settings(jb, result.codes, result.sr, dict(settings, **result.settings))
    audio = result.audio.float().cpu()
    with atomic_paths(paths) as tmps:
        for i in range(n):
            save_audio(tmps[i], audio[i], result.sr)
        write_codes(tmps[n], result.codes, jsonable(settings))
        if getattr(args, "plot", False):
            _plot(args, result, source, tmps[n + 1])
    for p in paths:
        print(p)
    return 0


def _write_rows(args, result, rows: range, n: int) -> list[Path]:
    """This process's samples of a run of ``n``, under the names a one-process run gives them."""
    from .audio import save_audio
    out = Path(args.out)
    audio = result.audio.float().cpu()
    return [save_audio(out if n == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}"), audio[j], result.sr)
            for j, i in enumerate(rows)]


def run_share(args, procs: Processes, n: int, body) -> int:
    """Sample this process's share of the run's ``n`` samples with ``body(rows) -> (jb, result
    or None, settings, source)`` and write the outputs (module docstring); one process: ``_write``."""
    rows = procs.share(n)
    if procs.world == 1:
        jb, result, settings, source = body(rows)
        return _write(args, jb, result, settings, source)
    prog = f"fastjukebox {args.command}"
    failure = codes = None
    try:
        jb, result, settings, source = body(rows)
        if result is not None:
            for p in _write_rows(args, result, rows, n):
                print(p)
            codes = [None if z is None else z.cpu().numpy() for z in result.codes]
    except Exception as exc:   # every process must reach the gather below, failed or not
        failure = f"{procs.describe(rows)} failed: {exc if isinstance(exc, ValueError) else repr(exc)}"
        print(f"{prog}: error: {failure}", file=sys.stderr, flush=True)
    parts = procs.gather((failure, codes))
    failed = [f for f, _ in parts if f is not None]
    if failed:
        if procs.is_main:
            print(f"{prog}: error: {len(failed)} of {procs.world} processes failed; no codes file written",
                  file=sys.stderr, flush=True)
        return 1
    if not procs.is_main:
        return 0
    shares = [c for _, c in parts if c is not None]
    combined = [None if shares[0][l] is None else np.concatenate([c[l] for c in shares])
                for l in range(len(shares[0]))]
    settings = codes_settings(jb, combined, result.sr, dict(settings, **result.settings, processes=procs.world))
    print(write_codes(Path(args.out).with_suffix(".npz"), combined, jsonable(settings)))
    if getattr(args, "plot", False):
        print(_plot(args, result, source, Path(args.out).with_suffix(".png")))
    return 0
