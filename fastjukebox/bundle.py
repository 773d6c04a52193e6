"""A model family: one VQ-VAE and a prior per level, loaded and saved together.

Directory layouts understood by ``load``:

* ours: ``vqvae/`` and ``prior_level_{0,1,2}/`` component directories (``config.json`` +
  ``model.safetensors``);
* the original release: ``vqvae.pth.tar`` and ``prior_level_{0,1,2}.pth.tar``.

Missing prior levels are allowed (e.g. upsamplers only); the VQ-VAE is required.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, load_component, save_component
from .prior import Prior
from .vqvae import VQVAE

ASSETS = Path(__file__).parent / "assets"


class Jukebox(nn.Module):
    """``vqvae`` plus ``priors[level]``; level 0 is the finest (bottom) level."""

    def __init__(self, vqvae: VQVAE, priors: dict[int, Prior]):
        super().__init__()
        self.vqvae = vqvae
        self.priors = nn.ModuleDict({str(level): p for level, p in sorted(priors.items())})
        for level, p in priors.items():
            if p.config.level != level:
                raise ValueError(f"prior given for level {level} models level {p.config.level}")
            if p.config.l_bins != vqvae.config.l_bins:
                raise ValueError(f"prior for level {level} has {p.config.l_bins} codes, the VQ-VAE {vqvae.config.l_bins}")

    def prior(self, level: int) -> Prior:
        if str(level) not in self.priors:
            raise ValueError(f"this model has no prior for level {level} (has: {self.levels})")
        return self.priors[str(level)]

    @property
    def levels(self) -> list[int]:
        return sorted(int(k) for k in self.priors)

    @property
    def sr(self) -> int:
        return self.vqvae.config.sr

    def save(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_component(self.vqvae, directory / "vqvae", dtype)
        for level in self.levels:
            save_component(self.prior(level), directory / f"prior_level_{level}", dtype)
        return directory


def _component(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.pth.tar"):
        if candidate.exists():
            return candidate
    return None


def load(path_or_name: str | os.PathLike = "demo", *, dtype: torch.dtype | None = None,
         device: torch.device | str = "cpu") -> Jukebox:
    """Load a model family from a directory (see module docstring) or a bundled name (``demo``)."""
    path = Path(path_or_name)
    if not path.exists() and str(path_or_name) in {p.name for p in ASSETS.glob("*") if p.is_dir()}:
        path = ASSETS / str(path_or_name)
    if not path.is_dir():
        bundled = sorted(p.name for p in ASSETS.glob("*") if p.is_dir())
        raise CheckpointError(f"{path_or_name!r} is not a model directory"
                              + (f" or a bundled model ({', '.join(bundled)})" if bundled else ""))
    vq_path = _component(path, "vqvae")
    if vq_path is None:
        raise CheckpointError(f"{path}: no vqvae/ or vqvae.pth.tar")
    vqvae = load_component(vq_path, "vqvae", dtype=dtype, device=device)
    priors = {}
    for level in range(vqvae.config.levels):
        p = _component(path, f"prior_level_{level}")
        if p is not None:
            priors[level] = load_component(p, "prior", dtype=dtype, device=device)
    if not priors:
        raise CheckpointError(f"{path}: no prior_level_* components")
    return Jukebox(vqvae, priors)
