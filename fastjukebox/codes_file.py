"""Codes files: the ``.npz`` a sampling run writes and ``upsample``, ``continue`` and ``decode``
read.

A codes file holds the codes of every level present (``codes_level0`` .. ``codes_level2``, each an
int64 array (N, T_level)) and ``settings``, a JSON string with the run's labels and sampling
settings, its length, number of samples and levels present.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path

CODES_KEY = "codes_level{}"
_CODES_RE = re.compile(r"^codes_level(\d+)$")


def read_codes(path: str | os.PathLike) -> tuple[list[np.ndarray | None], dict]:
    """Codes per level (level 0 first, None where absent) and the settings of a codes file."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise ValueError(f"cannot read codes file '{name}': no such file")
    if os.path.isdir(name):
        raise ValueError(f"cannot read codes file '{name}': it is a directory")
    try:
        if not zipfile.is_zipfile(name):
            raise ValueError("not a zip archive")
        with np.load(name, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"cannot read codes file '{name}': not a valid .npz file ({exc})") from None
    found = {int(m.group(1)): v for k, v in arrays.items() if (m := _CODES_RE.match(k))}
    if not found:
        raise ValueError(f"codes file '{name}' has no codes arrays (codes_level0, codes_level1, ...); "
                         f"it holds: {', '.join(sorted(arrays)) or 'nothing'}")
    codes: list[np.ndarray | None] = [None] * (max(found) + 1)
    n = None
    for level, z in sorted(found.items()):
        if z.dtype.kind not in "iu" or z.ndim not in (1, 2):
            raise ValueError(f"codes file '{name}': {CODES_KEY.format(level)} must be integer codes "
                             f"(N, T); got {z.dtype} shape {z.shape}")
        z = z[None] if z.ndim == 1 else z
        if n is not None and z.shape[0] != n:
            raise ValueError(f"codes file '{name}': the levels have different numbers of samples")
        n = z.shape[0]
        codes[level] = z.astype(np.int64)
    settings: dict = {}
    if "settings" in arrays:
        try:
            settings = json.loads(str(arrays["settings"]))
        except ValueError:
            raise ValueError(f"codes file '{name}': its settings are not valid JSON") from None
        if not isinstance(settings, dict):
            settings = {}
    return codes, settings


def write_codes(path: str | os.PathLike, codes, settings: dict) -> Path:
    """Write the codes present (level 0 first) and ``settings`` (JSON) to ``path``, atomically."""
    target = Path(path)
    arrays = {CODES_KEY.format(l): torch.as_tensor(z).cpu().numpy().astype(np.int64)
              for l, z in enumerate(codes) if z is not None}
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, settings=np.array(json.dumps(settings)), **arrays)
    return target


def sample_count(codes) -> int:
    """The number of samples (rows) of ``codes``, per level, level 0 first (None where absent)."""
    return next(z.shape[0] for z in codes if z is not None)


def codes_settings(jb, codes, sr: int, settings: dict) -> dict:
    """A run's settings for its codes file: the given ones and the length, count and levels of
    ``codes``."""
    top = max(l for l, z in enumerate(codes) if z is not None)
    return dict(settings, sr=sr, seconds=codes[top].shape[1] * jb.vqvae.hop_lengths[top] / sr,
                n_samples=int(codes[top].shape[0]), levels_present=[l for l, z in enumerate(codes) if z is not None])


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
