"""A model family: one VQ-VAE and a prior per level, loaded and saved together.

Directory layouts understood by ``load``:

* ours: ``vqvae/`` and ``prior_level_{0,1,2}/`` component directories (``config.json`` +
  ``model.safetensors``);
* the original release: ``vqvae.pth.tar`` and ``prior_level_{0,1,2}.pth.tar``;
* a Hugging Face ``JukeboxModel`` directory (``config.json`` of ``model_type: "jukebox"``; see
  :mod:`.hf_checkpoint`), read without transformers.

Missing prior levels are allowed (e.g. upsamplers only); the VQ-VAE is required. Distilled
parallel upsamplers are found beside the priors as ``student_level_{0,1}/`` and the drafters of
speculative sampling as ``drafter_level_{0,1}/`` (each read by the loader an extension registers
for its kind, ``register_component_loader``: the project's ``distill``), and the family's
recommended sampling settings in ``sampling.json`` (:mod:`.sampling_defaults`).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, load_component, save_component
from .prior import Prior
from .sampling_defaults import SamplingDefaults
from .settings import (SettingsError, check_codes, check_count, check_device, check_seconds, resolve_sampling,
                       warn_half_on_cpu)
from .vqvae import VQVAE

ASSETS = Path(__file__).parent / "assets"
# per-level components an extension can read, by kind: loader(path, device=, dtype=) -> module
_LOADERS: dict[str, list] = {"student": [], "drafter": []}


def register_component_loader(kind: str, loader) -> None:
    """Let ``load`` read ``{kind}_level_{L}/`` directories (``kind``: ``"student"``, a parallel
    upsampler; ``"drafter"``, a speculative drafter) with ``loader(path, device=..., dtype=...)``
    (a module that has ``config.level``). Registered by an extension (``fastjukebox.plugins``);
    without one, such directories are left unread."""
    if kind not in _LOADERS:
        raise ValueError(f"unknown component kind {kind!r}; known: {', '.join(_LOADERS)}")
    if not callable(loader):
        raise ValueError(f"a {kind} loader must be callable, got {loader!r}")
    if loader not in _LOADERS[kind]:
        _LOADERS[kind].append(loader)


class ConfigNote(UserWarning):
    """A hyperparameter of a loaded model taken from elsewhere than its own config, with why."""


class Jukebox(nn.Module):
    """``vqvae`` plus ``priors[level]``; level 0 is the finest (bottom) level."""

    def __init__(self, vqvae: VQVAE, priors: dict[int, Prior], students: dict[int, nn.Module] | None = None,
                 sampling: SamplingDefaults | dict | None = None, drafters: dict[int, nn.Module] | None = None):
        super().__init__()
        if not isinstance(sampling, SamplingDefaults):
            sampling = SamplingDefaults(vqvae.config.levels, sampling)
        self.sampling_defaults = sampling
        self.vqvae = vqvae
        self.priors = nn.ModuleDict({str(level): p for level, p in sorted(priors.items())})
        self.students = nn.ModuleDict({str(level): s for level, s in sorted((students or {}).items())})
        self.drafters = nn.ModuleDict({str(level): d for level, d in sorted((drafters or {}).items())})
        for level, p in priors.items():
            if p.config.level != level:
                raise ValueError(f"prior given for level {level} models level {p.config.level}")
            if p.config.l_bins != vqvae.config.l_bins:
                raise ValueError(f"prior for level {level} has {p.config.l_bins} codes, the VQ-VAE {vqvae.config.l_bins}")

    def prior(self, level: int) -> Prior:
        if str(level) not in self.priors:
            raise ValueError(f"this model has no prior for level {level} (has: {self.levels})")
        return self.priors[str(level)]

    def student(self, level: int) -> nn.Module:
        """The distilled parallel upsampler of ``level`` (sampler ``"parallel"``)."""
        if str(level) not in self.students:
            have = ", ".join(sorted(self.students)) or "none"
            raise ValueError(f"no parallel student for level {level} (students: {have}); train one with "
                             f"`python -m distill.train --teacher {'bottom' if level == 0 else 'middle'}` and "
                             f"put its directory beside the priors as student_level_{level}/")
        return self.students[str(level)]

    def drafter(self, level: int) -> nn.Module | None:
        """The drafter of ``level``'s speculative sampling, or None (the student drafts)."""
        return self.drafters[str(level)] if str(level) in self.drafters else None

    @property
    def levels(self) -> list[int]:
        return sorted(int(k) for k in self.priors)

    @property
    def upsampler_levels(self) -> tuple[int, ...]:
        """The levels ``upsample`` samples: those below the top with a prior, top first."""
        top = self.vqvae.config.levels - 1
        return tuple(l for l in sorted(self.levels, reverse=True) if l < top)

    @property
    def sr(self) -> int:
        return self.vqvae.config.sr

    # --- sampling -----------------------------------------------------------------------------
    def _labels_kw(self, artist, genre, lyrics, n_samples, total_seconds, offset_seconds, ids) -> dict:
        kw = dict(artist=artist, genre=genre, lyrics=lyrics, n_samples=n_samples,
                  offset=int(offset_seconds * self.sr), ids=ids)
        if total_seconds is not None:
            kw["total_length"] = int(total_seconds * self.sr)
        return kw

    def _check_codes(self, codes, level: int, n: int | None = None) -> torch.Tensor:
        z = check_codes(codes, f"level-{level} codes")
        if z.dim() == 1:
            z = z[None]
        if z.dim() != 2:
            raise SettingsError(f"level-{level} codes must be (N, T); got shape {tuple(z.shape)}")
        l_bins = self.vqvae.config.l_bins
        if z.min() < 0 or z.max() >= l_bins:
            raise SettingsError(f"level-{level} codes must be in [0, {l_bins})")
        if n is not None and z.shape[0] != n:
            raise SettingsError(f"level-{level} codes have {z.shape[0]} samples, expected {n}")
        return z.long()

    def resolve_sampling(self, levels, sampling: dict) -> dict:
        """``sampling`` (keyword arguments of a sampling call) checked and resolved for ``levels``
        (``fastjukebox.settings.resolve_sampling``): named errors before any model work."""
        from .plugins import load_plugins
        from .samplers import check_sampler_options, choose_samplers
        load_plugins()
        return resolve_sampling(self, levels, sampling, choose_samplers, check_sampler_options)

    def sample(self, artist=0, genre=0, lyrics: str = "", *, seconds: float = 10.0, n_samples: int = 1,
               total_seconds: float | None = None, offset_seconds: float = 0.0, levels=None, prompt=None,
               ids=None, **sampling):
        """Sample ``n_samples`` pieces of ``seconds`` audio, top level down.

        artist, genre: names (with ``ids``: the original id files as ``LabelIds``) or numeric ids.
        prompt: audio (T,) or (N, T) at ``sr``; it is encoded at every level and continued
            (the original's primed mode).
        seconds: finite, at most ``fastjukebox.settings.MAX_SECONDS``.
        sampling: temperature (0: greedy), top_k, top_p (one value, or per level as
            {level: value} naming sampled levels only; unset: the family's
            ``sampling_defaults``, else 0.99 / off / off), chunk_size, hop_fraction,
            max_batch_size, seed, sampler ("ar", "ar-graph" (CUDA-graph decode steps on a GPU),
            "parallel" (distilled students for the upsamplers), "speculative" (the exact
            distribution, drafted by the students) or {level: name}), sampler_options
            ({option: value} for the chosen samplers, each checked and defaulted by the sampler
            that declares it (``fastjukebox.samplers``): "parallel" takes passes (decoding passes
            per window; default: each student's own, from its sampling.json), "speculative" gamma
            (positions the teacher verifies per call); ``passes=`` and ``gamma=`` are short for
            these), progress, sample_seeds (one seed per sample: each sample is drawn from its own
            generator, see ``sample_seeds``), run_samples (the samples of the whole run when this
            call draws a share of them: samplers that choose their strategy by the batch size, as
            "speculative" does, choose by the run's).
        Every setting is checked before any model work (``fastjukebox.settings``: a
        ``SettingsError`` names a bad one).
        Returns a ``SampleResult`` (codes per level, level 0 first; audio (N, T) in [-1, 1];
        ``settings``: the settings as used, the drawn seed included).
        """
        from .generate import run, seconds_to_length
        levels = tuple(sorted(self.levels, reverse=True)) if levels is None else tuple(levels)
        n_samples = check_count(n_samples, "n_samples")
        length = seconds_to_length(self, check_seconds(seconds))
        settings = self.resolve_sampling(levels, sampling)
        codes = None
        if prompt is not None:
            from .audio import warn_if_loud
            audio = warn_if_loud(torch.as_tensor(prompt, dtype=torch.float32), "the prompt")
            audio = audio[None] if audio.dim() == 1 else audio
            if audio.shape[0] == 1 and n_samples > 1:
                audio = audio.expand(n_samples, -1)
            hop = self.vqvae.hop_lengths[-1]
            keep = min(audio.shape[1] // hop * hop, length)
            if keep == 0:
                raise ValueError(f"the prompt is shorter than one top-level code ({hop} samples)")
            codes = self.vqvae.encode(audio[:, :keep])
        return run(self, codes=codes, levels=levels, sample_length=length,
                   labels_kw=self._labels_kw(artist, genre, lyrics, n_samples, total_seconds, offset_seconds, ids),
                   **settings)

    def upsample(self, top_codes, artist=0, genre=0, lyrics: str = "", *, total_seconds=None,
                 offset_seconds: float = 0.0, ids=None, **sampling):
        """Sample the levels below the top from given top-level codes (N, T_top)."""
        from .generate import run
        top = self.vqvae.config.levels - 1
        z = self._check_codes(top_codes, top)
        codes = [None] * top + [z]
        levels = self.upsampler_levels
        settings = self.resolve_sampling(levels, sampling)
        return run(self, codes=codes, levels=levels, sample_length=z.shape[1] * self.vqvae.hop_lengths[-1],
                   labels_kw=self._labels_kw(artist, genre, lyrics, z.shape[0], total_seconds, offset_seconds, ids),
                   **settings)

    def continue_(self, codes, artist=0, genre=0, lyrics: str = "", *, seconds: float, total_seconds=None,
                  offset_seconds: float = 0.0, levels=None, ids=None, **sampling):
        """Continue saved codes (per level, level 0 first; None for none) to ``seconds`` in total."""
        from .generate import run, seconds_to_length
        if len(codes) != self.vqvae.config.levels:
            raise ValueError(f"codes must list {self.vqvae.config.levels} levels, level 0 first; got {len(codes)}")
        first = next(((l, z) for l, z in enumerate(codes) if z is not None), None)
        if first is None:
            raise SettingsError("no codes given to continue from")
        n = self._check_codes(first[1], first[0]).shape[0]
        zs = [None if z is None else self._check_codes(z, l, n) for l, z in enumerate(codes)]
        length = seconds_to_length(self, check_seconds(seconds))
        for l, z in enumerate(zs):
            if z is not None and z.shape[1] > length // self.vqvae.hop_lengths[l]:
                raise ValueError(f"level-{l} codes ({z.shape[1]}) already exceed {seconds} s "
                                 f"({length // self.vqvae.hop_lengths[l]} codes)")
        levels = tuple(sorted(self.levels, reverse=True)) if levels is None else tuple(levels)
        settings = self.resolve_sampling(levels, sampling)
        return run(self, codes=zs, levels=levels, sample_length=length,
                   labels_kw=self._labels_kw(artist, genre, lyrics, n, total_seconds, offset_seconds, ids),
                   **settings)

    def save(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_component(self.vqvae, directory / "vqvae", dtype)
        for level in self.levels:
            save_component(self.prior(level), directory / f"prior_level_{level}", dtype)
        for kind, modules in (("student", self.students), ("drafter", self.drafters)):
            for level, module in modules.items():
                module.save(directory / f"{kind}_level_{level}", dtype=dtype)
        self.sampling_defaults.save(directory)
        return directory

    def save_hf(self, directory: str | os.PathLike, **kwargs) -> Path:
        """Write a Hugging Face ``JukeboxModel`` directory (see ``hf_checkpoint.write_hf``); what
        the port cannot keep is warned about as a ``ConfigNote``."""
        from .hf_checkpoint import write_hf
        out, notes = write_hf(self.vqvae, {level: self.prior(level) for level in self.levels}, directory, **kwargs)
        for note in notes:
            warnings.warn(note, ConfigNote, stacklevel=2)
        return out


def _component(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.pth.tar"):
        if candidate.exists():
            return candidate
    return None


def load(path_or_name: str | os.PathLike = "demo", *, dtype: torch.dtype | None = None,
         device: torch.device | str = "cpu") -> Jukebox:
    """Load a model family from a directory (see module docstring) or a bundled name (``demo``)."""
    if not str(path_or_name).strip():
        raise CheckpointError("no model given: pass a model directory or a bundled name (e.g. 'demo')")
    device = check_device(device)
    warn_half_on_cpu(dtype, device)
    path = Path(path_or_name)
    if not path.exists() and str(path_or_name) in {p.name for p in ASSETS.glob("*") if p.is_dir()}:
        path = ASSETS / str(path_or_name)
    if not path.is_dir():
        bundled = sorted(p.name for p in ASSETS.glob("*") if p.is_dir())
        raise CheckpointError(f"{path_or_name!r} is not a model directory"
                              + (f" or a bundled model ({', '.join(bundled)})" if bundled else ""))
    from .hf_checkpoint import is_hf_directory, read_hf
    if is_hf_directory(path):
        vqvae, priors, notes = read_hf(path, dtype=dtype, device=device)
        for note in notes:
            warnings.warn(note, ConfigNote, stacklevel=2)
        return Jukebox(vqvae, priors)
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
    from .plugins import load_plugins
    load_plugins()
    found: dict[str, dict[int, nn.Module]] = {kind: {} for kind in _LOADERS}
    for kind, loaders in _LOADERS.items():
        for level in range(vqvae.config.levels - 1):
            p = path / f"{kind}_level_{level}"
            if p.is_dir() and loaders:
                module = found[kind][level] = loaders[-1](p, device=device, dtype=dtype)
                if module.config.level != level:
                    raise CheckpointError(f"{p}: holds a {kind} for level {module.config.level}, not level {level}")
    return Jukebox(vqvae, priors, found["student"], SamplingDefaults.load(path, vqvae.config.levels),
                   drafters=found["drafter"])
