"""Shared paths, fixture loaders and tolerances.

The fixtures in ``tests/data`` are outputs of the original implementation computed in float64 from
the float32 weights stored in the tiny checkpoints (see ``tests/data/MANIFEST.md``).
"""
from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported: the suite runs on small CI boxes

import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

# Without a GPU the Triton kernels run in Triton's interpreter. The mode is fixed when triton is
# first imported, so it is set here, before any test module imports a kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # a plain ``pytest`` run from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

DATA = Path(__file__).resolve().parent / "data"
KEYS = DATA / "keys"

PRIOR_FIXTURES = ("tiny_upsampler_level_0", "tiny_upsampler_level_1", "tiny_prior_5b", "tiny_prior_5b_lyrics",
                  "tiny_prior_1b_lyrics")
PRESET_NAMES = ("vqvae", "upsampler_level_0", "upsampler_level_1", "prior_5b", "prior_5b_lyrics", "prior_1b_lyrics")


def checkpoint_path(name: str) -> Path:
    return DATA / f"{name}.pth.tar"


def hps_path(name: str) -> Path:
    return DATA / f"{name}.json"


@lru_cache(maxsize=None)
def _io(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{name}_io.npz") as f:
        return {k: f[k] for k in f.files}


def io(name: str) -> dict[str, torch.Tensor]:
    """The ``<name>_io.npz`` arrays as (fresh) tensors."""
    return {k: torch.from_numpy(v.copy()) for k, v in _io(name).items()}


@lru_cache(maxsize=None)
def load_prior(name: str, dtype: torch.dtype = torch.float64):
    """A tiny fixture prior, loaded once per dtype (do not modify the returned module)."""
    from fastjukebox.checkpoint import load_prior as load_prior_file
    return load_prior_file(checkpoint_path(name), dtype=dtype)


@lru_cache(maxsize=None)
def load_vqvae(dtype: torch.dtype = torch.float64):
    from fastjukebox.checkpoint import load_vqvae as load_vqvae_file
    return load_vqvae_file(checkpoint_path("tiny_vqvae"), dtype=dtype)


def prior_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(z, z_cond or None, y) of a prior fixture."""
    d = io(name)
    return d["z"], d.get("z_cond"), d["y"]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in float64."""
    got, ref = torch.as_tensor(got).double(), torch.as_tensor(ref).double()
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    assert scale > 0, "reference is all zeros: the comparison would be meaningless"
    return (got - ref).abs().max().item() / scale


def read_keys(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) per line of ``keys/<name>_keys.txt``, in state-dict order."""
    out = []
    for line in (KEYS / f"{name}_keys.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        key, rest = line.split(" ", 1)
        shape_text = rest if name == "vqvae" else rest.rsplit(" ", 1)[0]
        shape = tuple(int(s) for s in shape_text.strip().strip("[]").split(",") if s.strip())
        out.append((key, shape))
    return out


@lru_cache(maxsize=None)
def meta_model(name: str):
    """A released architecture built on the meta device (no memory for the weights)."""
    from fastjukebox import VQVAE, Prior
    with torch.device("meta"):
        return VQVAE.from_preset(name) if name == "vqvae" else Prior.from_preset(name)


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator, fresh for every test."""
    return torch.Generator().manual_seed(1234)
