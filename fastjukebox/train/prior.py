"""Prior training on codes: teacher-forced cross-entropy (``Prior.loss``, bits per token).

Each example is a random window of ``n_ctx`` codes of the prior's level, with

* the codes of the level above covering the same audio (upsamplers: the conditioner's input);
* its label row ``[total_length, offset, sample_length, artist, genre x G, lyrics x n]`` built by
  :class:`fastjukebox.labels.Labeller` from the piece's labels and the window's offset.

``upper_noise`` (upsamplers): the share of upper-level codes replaced by uniformly random codes in
each training window (conditioning augmentation). At sampling time an upsampler is conditioned on
*sampled* upper codes, which are less clean than the encoded ones it trains on; training on
corrupted conditioning teaches it not to copy every upper-level error into its output.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..checkpoint import load_prior
from ..config import resolve_config
from ..labels import Labeller, Labels
from ..prior import Prior
from .data import CodeBatch, CodeWindows, step_rng
from .loop import TrainConfig, TrainResult, json_safe, train

__all__ = ["PriorTask", "prior_code_windows", "level_hop_lengths", "train_prior"]

_UPPER_NOISE_STREAM = 1      # step_rng stream of the upper-code noise (the windows are drawn from stream 0)


def level_hop_lengths(config) -> tuple[int, ...]:
    """Audio samples per code at each level of the VQ-VAE geometry a prior config describes."""
    downs = [s ** d for s, d in zip(config.strides_t, config.downs_t)]
    return tuple(math.prod(downs[: i + 1]) for i in range(config.levels))


def prior_code_windows(config, pieces: Sequence[Sequence[Any]], labels: Sequence[Any] | None = None,
                       lengths: Sequence[int] | None = None, seed: int = 0) -> CodeWindows:
    """:class:`CodeWindows` with the geometry of the prior ``config``; for a top prior with a
    timing signal, pieces outside ``[min_duration, max_duration)`` are left out."""
    rng = None
    if config.time_signal:
        rng = (config.min_duration * config.sr, config.max_duration * config.sr)
    return CodeWindows(pieces, config.level, config.n_ctx, level_hop_lengths(config),
                       upper_down=config.cond_downsample, labels=labels, lengths=lengths,
                       length_range=rng, seed=seed)


class PriorTask:
    """Trains a :class:`Prior` on windows of :class:`CodeWindows` (for ``fastjukebox.train.loop``)."""

    def __init__(self, prior: Prior, data: CodeWindows, seed: int = 0, upper_noise: float = 0.0):
        c = prior.config
        if not 0.0 <= upper_noise < 1.0:
            raise ValueError(f"upper_noise must be in [0, 1), got {upper_noise}")
        if upper_noise and c.cond_downsample is None:
            raise ValueError("upper_noise corrupts the upper-level codes of an upsampler; this prior has none")
        self.upper_noise = float(upper_noise)
        if data.level != c.level or data.n_ctx != c.n_ctx:
            raise ValueError(f"data windows are {data.n_ctx} level-{data.level} codes, the prior models "
                             f"{c.n_ctx} level-{c.level} codes")
        if data.down != c.cond_downsample:
            raise ValueError(f"data pairs windows with upper codes down-sampled by {data.down}, the prior "
                             f"expects {c.cond_downsample}")
        if data.hop != level_hop_lengths(c)[c.level]:
            raise ValueError(f"data hop length {data.hop} differs from the prior's {level_hop_lengths(c)[c.level]}")
        for i, z in enumerate(data.tokens):
            if z.size and (z.min() < 0 or z.max() >= c.l_bins):
                raise ValueError(f"piece {i}: codes must be in [0, {c.l_bins}), got [{z.min()}, {z.max()}]")
        self.model, self.data, self.seed = prior, data, int(seed)
        self.name = f"prior_level_{c.level}"
        self.labeller = None
        if c.labels:
            self.labeller = Labeller(c.max_bow_genre_size, c.n_tokens, c.sample_length,
                                     "v3" if c.labels_v3 else "v2")
            genres, artists = c.y_bins
            for i, lab in enumerate(data.labels):
                g = lab.genre if isinstance(lab.genre, list) else [lab.genre]
                if not 0 <= lab.artist < artists:
                    raise ValueError(f"piece {i}: artist id {lab.artist} outside [0, {artists}) (y_bins)")
                if any(not 0 <= x < genres for x in g):
                    raise ValueError(f"piece {i}: genre ids {g} outside [0, {genres}) (y_bins)")

    def labels(self, batch: CodeBatch) -> torch.Tensor | None:
        """(B, label_len) label rows of a batch's windows, or None for an unlabelled prior."""
        if self.labeller is None:
            return None
        rows = []
        for i, off, total in zip(batch.piece.tolist(), batch.offset.tolist(), batch.total_length.tolist()):
            lab = self.data.labels[i]
            rows.append(self.labeller.label(lab.artist, lab.genre, lab.lyrics, total, off))
        return Labels.stack(rows).y

    def corrupt_upper(self, upper: torch.Tensor, step: int) -> torch.Tensor:
        """``upper`` with a random ``upper_noise`` share of its codes replaced by uniform random
        codes (a fixed function of the task seed and the step, so resumed runs see the same)."""
        if not self.upper_noise:
            return upper
        rng = step_rng(self.seed, step, _UPPER_NOISE_STREAM)
        hit = torch.from_numpy(rng.random(tuple(upper.shape)) < self.upper_noise)
        noise = torch.from_numpy(rng.integers(0, self.model.config.l_bins, tuple(upper.shape)))
        return torch.where(hit, noise.to(upper.dtype), upper)

    def loss(self, step: int, batch_size: int, device: torch.device):
        b = self.data.batch(step, batch_size)
        upper = None if b.upper is None else self.corrupt_upper(b.upper, step).to(device)
        labels = self.labels(b)
        out = self.model.loss(b.tokens.to(device), upper, None if labels is None else labels.to(device))
        metrics = {"gen_loss": out["gen_loss"].detach()}
        if self.model.config.lyrics is not None:
            metrics["prime_loss"] = out["prime_loss"].detach()
        return out["loss"], metrics

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass

    def fingerprint(self) -> dict:
        fp = {"kind": "prior", "model": self.model.config.to_dict(), "data_seed": self.data.seed,
              "pieces": len(self.data), "seed": self.seed}
        if self.upper_noise:            # absent when off, so runs saved before the option still resume
            fp["upper_noise"] = self.upper_noise
        return json_safe(fp)


def train_prior(config, pieces: Sequence[Sequence[Any]], train_cfg: TrainConfig,
                labels: Sequence[Any] | None = None, lengths: Sequence[int] | None = None,
                init: Prior | str | None = None, data_seed: int | None = None,
                upper_noise: float = 0.0) -> tuple[Prior, TrainResult]:
    """Build (or take ``init``: a Prior or a path for ``fastjukebox.load_prior``) and train a prior
    on code pieces (per piece, codes per level, level 0 first).

    config: a ``PriorConfig``, preset name or JSON path (ignored when ``init`` is given).
    labels: per piece, ``PieceLabels`` or dicts (artist, genre, lyrics, total_length).
    lengths: per piece, its length in audio samples (default: codes x hop length).
    upper_noise: share of upper-level codes randomised per window (upsamplers; see module doc).
    The weights end in ``<train_cfg.out_dir>/prior_level_<level>``. Returns (model, result).
    """
    if init is None:
        torch.manual_seed(train_cfg.seed)
        model = Prior(resolve_config(config, "prior"))
    else:
        model = init if isinstance(init, Prior) else load_prior(init)
    data = prior_code_windows(model.config, pieces, labels, lengths,
                              seed=train_cfg.seed if data_seed is None else data_seed)
    result = train(PriorTask(model, data, seed=train_cfg.seed, upper_noise=upper_noise), train_cfg)
    return model.eval(), result
