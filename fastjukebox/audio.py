"""Audio file I/O and band-limited resampling.

``load_audio`` reads any file libsndfile understands (WAV, FLAC, OGG, AIFF, ...) into a float32
mono tensor in [-1, 1] at the model's sample rate; ``save_audio`` writes WAV or FLAC atomically;
``resample`` converts between sample rates.

Resampling
----------
``resample`` is band-limited interpolation with a Kaiser-windowed sinc, evaluated exactly for the
rational ratio ``sr_out / sr_in = L / M`` (reduced by their gcd). Output sample ``m`` sits at
input time ``t = m * M / L`` (in input samples) and is::

    y[m] = sum_k x[k] * h(t - k),
    h(d) = r * sinc(r * d) * kaiser(r * d / WIDTH),   r = ROLLOFF * min(sr_in, sr_out) / sr_in

i.e. a low-pass with its -6 dB cutoff at ``ROLLOFF * min(sr_in, sr_out) / 2`` Hz, truncated to
``WIDTH`` zero crossings of the sinc on either side and tapered by a Kaiser window with parameter
``BETA``. The taps of every output phase are rescaled to sum to exactly 1, so DC passes unchanged.

With the defaults (``WIDTH = 64``, ``BETA = 10``, ``ROLLOFF = 0.95``), relative to the Nyquist
frequency ``F = min(sr_in, sr_out) / 2``:

* pass band: gain within 0.1 % of 1 up to ``0.909 F`` (about 20 kHz when either rate is 44.1 kHz);
* transition band: ``0.909 F`` to ``F``;
* stop band: at least 90 dB of attenuation from ``0.997 F`` up, so anything that would fold back
  (alias, when downsampling) or any spectral image (when upsampling) is at least 90 dB down.

The filter is applied as a polyphase filter bank: the ``L`` phases of ``h`` form the output
channels of a single ``torch.nn.functional.conv1d`` with stride ``M`` over the input, which is
the zero-stuff-by-``L``, filter, keep-every-``M``-th scheme without computing the discarded
samples. For ratios whose ``L`` is so large that the filter bank would not fit comfortably in
memory (e.g. 44056 -> 44100), the same kernel is kept as one compact row of taps per phase
and applied by gathering the input around each output sample.

The signal is taken to be silent outside its ends (zero padding), and the output has
``ceil(T * sr_out / sr_in)`` samples, the samples at times ``m / sr_out`` that fall inside the
input's duration ``T / sr_in``. The method is deterministic: a fixed filter and no randomness,
so the same input gives bit-identical output on the same device and build.

``soundfile`` is imported only inside the functions that touch files, so this module (and
``resample``) work on machines where it is not installed.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_path

__all__ = ["AudioError", "SUPPORTED_SUFFIXES", "audio_paths", "warn_if_loud", "load_audio", "resample", "save_audio"]

#: Suffixes ``save_audio`` writes, with the libsndfile major format used for each.
SUPPORTED_SUFFIXES: dict[str, str] = {".wav": "WAV", ".flac": "FLAC"}

#: Zero crossings of the windowed sinc kept on each side of its centre.
WIDTH = 64
#: Kaiser window parameter (stop-band attenuation of at least 90 dB with WIDTH = 64).
BETA = 10.0
#: Cutoff as a fraction of the lower Nyquist frequency (the -6 dB point of the filter).
ROLLOFF = 0.95

# Largest polyphase filter bank (phases x taps) built for conv1d; beyond it the compact
# per-phase form is used, built and applied in chunks of about this many values.
_MAX_BANK = 1 << 22


class AudioError(ValueError):
    """An audio file cannot be read or written, or audio data or settings are invalid."""


# --------------------------------------------------------------------------------------------
# soundfile, imported lazily
# --------------------------------------------------------------------------------------------

def _soundfile() -> Any:
    try:
        import soundfile
    except (ImportError, OSError) as exc:  # OSError: the package is there, libsndfile is not
        raise ImportError(
            "reading and writing audio files needs the 'soundfile' package (and the libsndfile "
            f"library it wraps), which could not be imported ({exc}); install it with "
            "`pip install soundfile`") from exc
    return soundfile


def _reason(exc: BaseException) -> str:
    """soundfile's own explanation of a failure, without the file name it repeats."""
    text = getattr(exc, "error_string", None)
    return str(text if text else exc).strip() or type(exc).__name__


# --------------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------------

def _rate(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise AudioError(f"{name} must be a positive integer sample rate, got {value!r}")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise AudioError(f"{name} must be a positive integer sample rate, got {value!r}") from None
    if not math.isfinite(as_float) or as_float <= 0 or as_float != int(as_float):
        raise AudioError(f"{name} must be a positive integer sample rate, got {value!r}")
    return int(as_float)


def _ratio(sr_in: int, sr_out: int) -> tuple[int, int, float, int]:
    """(L, M, r, width): reduced up/down factors, the filter's cutoff scale in cycles per input
    sample times 2, and the filter's half-length in whole input samples."""
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    r = ROLLOFF * min(up, down) / down
    return up, down, r, math.ceil(WIDTH / r)


def _kernel(d: torch.Tensor, r: float) -> torch.Tensor:
    """h(d) for offsets d in input samples (float64), rows normalised to sum to 1."""
    u = r * d
    inside = u.abs() <= WIDTH
    arg = (1.0 - (u / WIDTH) ** 2).clamp_min(0.0)
    window = torch.special.i0(BETA * arg.sqrt()) / torch.special.i0(torch.tensor(BETA, dtype=d.dtype))
    h = torch.where(inside, r * torch.sinc(u) * window, torch.zeros_like(u))
    return h / h.sum(dim=-1, keepdim=True)


def _filter_bank(up: int, down: int, r: float, width: int, device: torch.device) -> torch.Tensor:
    """[L, 1, 2*width + M] conv1d weights: phase p, tap j weights input ``q*M + j - width`` for
    output ``q*L + p``."""
    phase = torch.arange(up, dtype=torch.float64, device=device)[:, None] * down / up
    taps = torch.arange(2 * width + down, dtype=torch.float64, device=device)[None, :]
    return _kernel(phase + width - taps, r)[:, None, :]


def _resample_bank(x: torch.Tensor, up: int, down: int, r: float, width: int, n_out: int
                   ) -> torch.Tensor:
    bank = _filter_bank(up, down, r, width, x.device).to(x.dtype)
    padded = F.pad(x[:, None, :], (width, width + down))
    y = F.conv1d(padded, bank, stride=down)                 # [N, L, Q]
    return y.transpose(1, 2).reshape(x.shape[0], -1)[:, :n_out]


def _resample_gather(x: torch.Tensor, up: int, down: int, r: float, width: int, n_out: int
                     ) -> torch.Tensor:
    """Same filter as ``_resample_bank``, with one compact row of 2*width + 1 taps per phase
    (taps ``floor(t) - width .. floor(t) + width``), gathered per output sample."""
    n = x.shape[0]
    offsets = torch.arange(-width, width + 1, device=x.device)
    taps = offsets.numel()
    rows = min(up, n_out)                       # phases actually used
    bank = torch.empty((rows, taps), dtype=x.dtype, device=x.device)
    step = max(1, _MAX_BANK // taps)
    for p0 in range(0, rows, step):
        p = torch.arange(p0, min(p0 + step, rows), dtype=torch.int64, device=x.device)
        frac = ((p * down) % up).to(torch.float64) / up
        bank[p0:p0 + p.numel()] = _kernel(frac[:, None] - offsets[None, :].to(torch.float64), r)
    pad = width + 1
    padded = F.pad(x, (pad, pad))
    chunk = max(1, _MAX_BANK // (taps * n))
    out = []
    for m0 in range(0, n_out, chunk):
        m = torch.arange(m0, min(m0 + chunk, n_out), dtype=torch.int64, device=x.device)
        idx = ((m * down) // up)[:, None] + offsets[None, :] + pad
        out.append((padded[:, idx] * bank[m % up][None]).sum(dim=-1))
    return torch.cat(out, dim=1)


def resample(audio: torch.Tensor | np.ndarray, sr_in: int, sr_out: int) -> torch.Tensor:
    """Resample ``audio`` ((T,) or (N, T), along the last axis) from ``sr_in`` to ``sr_out`` Hz.

    Band-limited Kaiser-windowed-sinc interpolation (see the module docstring): pass band flat to
    0.1 % up to 0.909 of the lower Nyquist frequency, at least 90 dB of anti-aliasing / anti-
    imaging attenuation above it, zero padding at the ends, deterministic. Returns a tensor on
    the input's device with ``ceil(T * sr_out / sr_in)`` samples; float64 input stays float64,
    other floating types are computed and returned in float32 (half precision is cast back).
    When the rates are equal the input is returned as is (as a tensor).
    """
    return _resample(audio, _rate(sr_in, "sr_in"), _rate(sr_out, "sr_out"))


def _resample(audio: torch.Tensor | np.ndarray, sr_in: int, sr_out: int) -> torch.Tensor:
    x = torch.as_tensor(audio)
    if x.dim() not in (1, 2):
        raise AudioError(f"audio must have shape (T,) or (N, T); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise AudioError(f"audio must be floating point, got {x.dtype}")
    if sr_in == sr_out:
        return x
    out_dtype = x.dtype
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    squeeze = work.dim() == 1
    work = work.reshape(1, -1) if squeeze else work
    length = work.shape[-1]
    up, down, r, width = _ratio(sr_in, sr_out)
    n_out = -(-length * up // down)
    if length == 0 or work.shape[0] == 0:
        y = work.new_zeros((work.shape[0], n_out))
    elif up * (2 * width + down) <= _MAX_BANK:
        y = _resample_bank(work.contiguous(), up, down, r, width, n_out)
    else:
        y = _resample_gather(work.contiguous(), up, down, r, width, n_out)
    y = y.to(out_dtype)
    return y[0] if squeeze else y


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def load_audio(path: str | os.PathLike, sr: int = 44100, resample: bool = True,
               duration: float | None = None, offset: float = 0.0) -> torch.Tensor:
    """Read an audio file as a float32 mono tensor of shape (T,) with values in [-1, 1].

    Any format libsndfile reads is accepted. Several channels are down-mixed to their mean. A
    file whose sample rate differs from ``sr`` is resampled to ``sr`` with :func:`resample`, or,
    with ``resample=False``, rejected with an :class:`AudioError` naming both rates.

    ``offset`` and ``duration`` (seconds, in the file's own time base) select a segment: it
    starts at ``offset`` (which must lie before the end of the file) and lasts ``duration``
    seconds, or less if the file ends first; ``duration=None`` reads to the end. When the segment
    is resampled, up to the filter's length of neighbouring audio is read on either side, so the
    segment comes out as it would have inside the resampled whole file.

    A file that peaks above full scale (a float file, e.g. at 9.5) is clipped to [-1, 1] with a
    warning naming its peak (normalise it first to keep its shape).

    Raises :class:`AudioError` (naming the file) when it is missing, unreadable, corrupt, empty
    or contains non-finite samples, and ``ImportError`` when soundfile is not installed.
    """
    sf = _soundfile()
    sr = _rate(sr, "sr")
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    offset = float(offset)
    if not math.isfinite(offset) or offset < 0:
        raise AudioError(f"offset must be a finite number of seconds >= 0, got {offset!r}")
    if duration is not None:
        duration = float(duration)
        if not math.isfinite(duration) or duration <= 0:
            raise AudioError(f"duration must be a positive number of seconds, got {duration!r}")
    if not os.path.exists(name):
        raise AudioError(f"cannot read audio file '{name}': no such file")
    if os.path.isdir(name):
        raise AudioError(f"cannot read audio file '{name}': it is a directory")
    if os.path.getsize(name) == 0:
        raise AudioError(f"cannot read audio file '{name}': the file is empty (0 bytes)")

    try:
        with sf.SoundFile(name) as f:
            sr_file, frames = int(f.samplerate), int(f.frames)
            if sr_file != sr and not resample:
                raise AudioError(
                    f"audio file '{name}' has a sample rate of {sr_file} Hz but the model uses "
                    f"{sr} Hz; pass resample=True to convert it, or resample the file first")
            if frames <= 0:
                raise AudioError(f"audio file '{name}' contains no audio samples")
            start = int(round(offset * sr_file))
            if start >= frames:
                raise AudioError(
                    f"offset {offset} s is beyond the end of audio file '{name}', which lasts "
                    f"{frames / sr_file:.6g} s ({frames} samples at {sr_file} Hz)")
            stop = frames if duration is None else min(frames, start + int(round(duration * sr_file)))
            if stop <= start:
                raise AudioError(f"duration {duration} s selects no samples of audio file "
                                 f"'{name}' at {sr_file} Hz")
            lead = tail = 0
            if sr_file != sr:
                up, down, _, width = _ratio(sr_file, sr)
                # context on the left in whole multiples of M keeps the output grid aligned
                lead = min(start, -(-(width + 1) // down) * down) // down * down
                tail = min(frames - stop, width + 1)
            first = start - lead
            if first:
                if f.seekable():
                    f.seek(first)
                else:
                    f.read(first, dtype="float32", always_2d=True)
            data = f.read(lead + (stop - start) + tail, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (RuntimeError, sf.SoundFileError, OSError, EOFError) as exc:
        raise AudioError(f"cannot read audio file '{name}': {_reason(exc)}") from exc

    if data.shape[0] <= lead:
        raise AudioError(f"audio file '{name}' contains no audio samples")
    if not np.isfinite(data).all():
        raise AudioError(f"audio file '{name}' contains non-finite (NaN or infinite) samples")
    mono = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float64),
                                                 dtype=np.float32))
    warn_if_loud(mono, f"audio file '{name}'")       # a float file louder than full scale
    if sr_file != sr:
        count = min(data.shape[0] - lead, stop - start)
        up, down, _, _ = _ratio(sr_file, sr)
        first_out = lead * up // down
        mono = _resample(mono, sr_file, sr)[first_out:first_out - (-count * up // down)]
    return mono.clamp_(-1.0, 1.0).contiguous()    # the resampling filter's overshoot only


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def _as_array(audio: Any) -> np.ndarray:
    if torch.is_tensor(audio):
        if not audio.is_floating_point():
            raise AudioError(f"audio must be floating point in [-1, 1], got {audio.dtype}")
        return audio.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(audio)
    if arr.dtype.kind != "f":
        raise AudioError(f"audio must be floating point in [-1, 1], got {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _write_atomic(sf: Any, target: Path, data: np.ndarray, sr: int, fmt: str, subtype: str) -> None:
    """Write to a fresh temporary file beside ``target``, sync it, then rename it over."""
    with atomic_path(target) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as fh:
            sf.write(fh, data, sr, subtype=subtype, format=fmt)
            fh.flush()
            os.fsync(fh.fileno())


def audio_paths(path: str | os.PathLike, n: int) -> list[Path]:
    """The files ``save_audio`` writes for ``n`` rows: ``path`` itself for one, else
    ``{stem}_{i}{suffix}`` beside it."""
    target = Path(path)
    if n == 1:
        return [target]
    return [target.with_name(f"{target.stem}_{i}{target.suffix}") for i in range(n)]


def warn_if_loud(audio: torch.Tensor, name: str) -> torch.Tensor:
    """``audio`` unchanged; a warning names its peak when it exceeds 1 (full scale), since the
    models take [-1, 1] and the louder samples are clipped there."""
    peak = float(audio.abs().max()) if audio.numel() else 0.0
    if peak > 1.0:
        warnings.warn(f"{name} peaks at {peak:.3g}, above full scale: clipped to [-1, 1]; divide it by "
                      f"{peak:.3g} (normalise it) for an unclipped input", UserWarning, stacklevel=2)
    return audio


def save_audio(path: str | os.PathLike, audio: torch.Tensor | np.ndarray, sr: int = 44100,
               subtype: str = "PCM_16") -> Path | list[Path]:
    """Write mono audio to a WAV or FLAC file chosen by the suffix of ``path``.

    ``audio`` is a torch tensor or numpy array of shape (T,) or (N, T) with floating-point values;
    values are clipped to [-1, 1] and written with libsndfile ``subtype`` (16-bit PCM by default;
    e.g. "PCM_24", or "FLOAT" for WAV only). Each file is written to a temporary file in the same
    directory and renamed into place, so an interrupted run never leaves a partial file; missing
    parent directories are created.

    Returns the written path for a (T,) input. For an (N, T) input returns a list of paths: the
    file ``path`` itself when N == 1, otherwise one file per row named ``{stem}_{i}{suffix}``
    (i = 0 .. N-1) beside ``path``.
    """
    sf = _soundfile()
    sr = _rate(sr, "sr")
    target = Path(os.fsdecode(os.fspath(path)))
    fmt = SUPPORTED_SUFFIXES.get(target.suffix.lower())
    if fmt is None:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise AudioError(f"cannot write '{target}': unsupported suffix {target.suffix!r}; "
                         f"supported suffixes are {supported}")
    if not isinstance(subtype, str) or not sf.check_format(fmt, subtype.upper()):
        options = ", ".join(sorted(sf.available_subtypes(fmt)))
        raise AudioError(f"cannot write '{target}': subtype {subtype!r} is not available for "
                         f"{fmt} files; choose one of {options}")
    subtype = subtype.upper()

    data = _as_array(audio)
    if data.ndim not in (1, 2):
        raise AudioError(f"audio must have shape (T,) or (N, T); got shape {data.shape}")
    if data.shape[-1] == 0 or data.size == 0:
        raise AudioError(f"cannot write '{target}': audio has no samples (shape {data.shape})")
    if not np.isfinite(data).all():
        raise AudioError(f"cannot write '{target}': audio contains NaN or infinite values")
    data = np.clip(data, -1.0, 1.0)

    rows: Sequence[np.ndarray] = [data] if data.ndim == 1 else list(data)
    targets = audio_paths(target, len(rows))
    target.parent.mkdir(parents=True, exist_ok=True)
    for row, dest in zip(rows, targets):
        try:
            _write_atomic(sf, dest, np.ascontiguousarray(row), sr, fmt, subtype)
        except (RuntimeError, sf.SoundFileError, TypeError) as exc:
            raise AudioError(f"cannot write audio file '{dest}': {_reason(exc)}") from exc
    return targets[0] if data.ndim == 1 else targets
