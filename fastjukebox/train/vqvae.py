"""VQ-VAE training: per level, encoder -> codebook -> decoder reconstructs the input window.

Loss (summed over the trained levels)::

    l2 * mean((x - x_hat)^2) / bw_l2 + l1 * mean|x - x_hat| / bw_l1
      + spectral * mean(||S(x) - S(x_hat)||) / bw_spec
      + multispectral * mean(multi-resolution ||S(x) - S(x_hat)||) / bw_spec
      + commit * mean((e - sg(q))^2)

with ``e`` the encoder output, ``q`` its nearest code and the decoder fed ``e + sg(q - e)``
(straight-through: the reconstruction gradient reaches the encoder as if there were no
quantisation). Codebooks learn by EMA with dead-code restarts (:class:`CodebookEMA`), outside the
module's state dict. ``bw_*`` are data bandwidths estimated once from the training data.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from ..checkpoint import load_vqvae
from ..config import resolve_config
from ..vqvae import VQVAE
from .codebook import CodebookEMA
from .data import AudioWindows
from .loop import TrainConfig, TrainResult, json_safe, train
from .losses import (MULTI_STFT, estimate_bandwidth, multispectral_distance, spectral_convergence,
                     spectral_distance, stft_magnitude)

__all__ = ["VQVAELossConfig", "VQVAETask", "vqvae_losses", "reconstruction_metrics", "codebook_usage", "train_vqvae"]


@dataclass(frozen=True)
class VQVAELossConfig:
    l2: float = 1.0
    l1: float = 0.0
    spectral: float = 0.0
    multispectral: float = 1.0
    commit: float = 0.02
    mu: float = 0.99                   # codebook EMA decay
    revival_threshold: float = 1.0     # codes with EMA count below this are restarted
    levels: tuple[int, ...] | None = None   # levels trained (None: all)


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 63))


def vqvae_losses(vqvae: VQVAE, audio: torch.Tensor, codebook: CodebookEMA | None, cfg: VQVAELossConfig,
                 bandwidth: dict[str, float], generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor | None]]:
    """Training forward of a batch.

    audio: (N, T) float, T a multiple of the top hop length. ``codebook``: updated in place
    (pass None to leave the codebooks unchanged, e.g. for evaluation).
    Returns (loss, metrics, reconstructions per level (N, T) or None for untrained levels).
    """
    c = vqvae.config
    levels = range(c.levels) if cfg.levels is None else cfg.levels
    if audio.dim() != 2 or audio.shape[1] % c.hop_lengths[-1]:
        raise ValueError(f"audio must be (N, T) with T a multiple of {c.hop_lengths[-1]}; got {tuple(audio.shape)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    x = audio[:, None, :]                                                         # [N, 1, T]
    target = audio.float()
    metrics: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=audio.device)
    outs: list[torch.Tensor | None] = [None] * c.levels
    target_mags = None
    if cfg.multispectral:
        with torch.no_grad():
            target_mags = [stft_magnitude(target, s) for s in MULTI_STFT]
    for l in levels:
        h = vqvae.encoders[l](x)                                                   # [N, C, T_l]
        hf = h.float()
        flat = hf.permute(0, 2, 1).reshape(-1, hf.shape[1])                        # [N*T_l, C]
        block = vqvae.bottleneck.level_blocks[l]
        if codebook is not None:
            codebook.maybe_init(l, flat, generator)
        codes = block.quantise(hf)                                                 # [N, T_l]
        q = block.dequantise(codes).float()                                        # [N, C, T_l]
        if codebook is not None:
            for k, v in codebook.update(l, flat, codes.reshape(-1), generator).items():
                metrics[f"{k}_l{l}"] = v
        with torch.autocast(audio.device.type, enabled=False):
            commit = (q.detach() - hf).pow(2).mean()
        st = h + (q.to(h.dtype) - h).detach()                                      # straight-through
        y = vqvae.decoders[l](st)[:, 0, :]                                         # [N, T]
        outs[l] = y
        with torch.autocast(audio.device.type, enabled=False):
            yf = y.float()
            recons = torch.zeros((), device=audio.device)
            if cfg.l2:
                recons = recons + cfg.l2 * (yf - target).pow(2).mean() / bandwidth["l2"]
            if cfg.l1:
                recons = recons + cfg.l1 * (yf - target).abs().mean() / bandwidth["l1"]
            spec = multi = torch.zeros((), device=audio.device)
            if cfg.spectral:
                spec = spectral_distance(target, yf).mean() / bandwidth["spec"]
            if cfg.multispectral:
                multi = multispectral_distance(target, yf, MULTI_STFT, target_mags).mean() / bandwidth["spec"]
            level_loss = recons + cfg.spectral * spec + cfg.multispectral * multi + cfg.commit * commit
        total = total + level_loss
        metrics.update({f"recons_loss_l{l}": recons.detach(), f"multispectral_loss_l{l}": multi.detach(),
                        f"commit_loss_l{l}": commit.detach(),
                        f"l2_l{l}": (yf - target).pow(2).mean().detach()})
        if cfg.spectral:
            metrics[f"spectral_loss_l{l}"] = spec.detach()
    return total, metrics, outs


class VQVAETask:
    """Trains a :class:`VQVAE` on random windows of :class:`AudioWindows` (for ``fastjukebox.train.loop``).

    fresh: initialise each codebook from the first batch's encoder vectors (new models); False
        keeps the loaded codebooks (fine-tuning).
    bandwidth: loss normalisers (see ``losses.estimate_bandwidth``); estimated from
        ``bandwidth_batches`` batches of the data when None.
    """

    name = "vqvae"

    def __init__(self, vqvae: VQVAE, data: AudioWindows, loss: VQVAELossConfig = VQVAELossConfig(),
                 seed: int = 0, fresh: bool = True, bandwidth: dict[str, float] | None = None,
                 bandwidth_batches: int = 4, bandwidth_batch_size: int = 8):
        c = vqvae.config
        if data.window % c.hop_lengths[-1]:
            raise ValueError(f"the training window ({data.window} samples) must be a multiple of the top "
                             f"hop length {c.hop_lengths[-1]}")
        if loss.levels is not None and not all(0 <= l < c.levels for l in loss.levels):
            raise ValueError(f"loss.levels {loss.levels} outside 0..{c.levels - 1}")
        if (loss.spectral or loss.multispectral) and data.window <= 1024:
            raise ValueError(f"spectral losses need windows longer than 1024 samples, got {data.window}")
        self.model, self.data, self.cfg, self.seed = vqvae, data, loss, int(seed)
        self.codebook = CodebookEMA(vqvae, loss.mu, loss.revival_threshold, init_from_data=fresh)
        if bandwidth is None:
            bandwidth = estimate_bandwidth(data.batch(i, bandwidth_batch_size, stream=1).audio
                                           for i in range(bandwidth_batches))
        self.bandwidth = {k: float(v) for k, v in bandwidth.items()}

    def loss(self, step: int, batch_size: int, device: torch.device):
        audio = self.data.batch(step, batch_size).audio.to(device)
        loss, metrics, _ = vqvae_losses(self.model, audio, self.codebook, self.cfg, self.bandwidth,
                                        _generator(self.seed, step))
        return loss, metrics

    def state_dict(self) -> dict:
        return {"codebook": self.codebook.state_dict(),
                "bandwidth": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.bandwidth.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.codebook.load_state_dict(sd["codebook"])
        self.bandwidth = {k: float(v) for k, v in sd["bandwidth"].items()}

    def fingerprint(self) -> dict:
        d = {"kind": "vqvae", "model": self.model.config.to_dict(), "window": self.data.window,
             "data_seed": self.data.seed, "pieces": len(self.data), "seed": self.seed, **asdict(self.cfg)}
        return json_safe(d)


# --- evaluation --------------------------------------------------------------------------------

def _trim(vqvae: VQVAE, audio) -> torch.Tensor:
    a = torch.as_tensor(audio, dtype=torch.float32)
    a = a[None] if a.dim() == 1 else a
    hop = vqvae.hop_lengths[-1]
    n = a.shape[1] // hop * hop
    if n == 0:
        raise ValueError(f"audio of {a.shape[1]} samples is shorter than one top-level code ({hop})")
    return a[:, :n]


@torch.no_grad()
def reconstruction_metrics(vqvae: VQVAE, audio) -> list[dict[str, float]]:
    """Per level: ``l1``, ``l2`` (mean errors), ``snr_db`` and ``spectral_convergence`` of
    decode(encode(audio)) against audio (N, T) or (T,), trimmed to whole top-level codes."""
    a = _trim(vqvae, audio)
    p = next(vqvae.parameters())
    codes = vqvae.encode(a.to(p.device, p.dtype))
    out = []
    for l, z in enumerate(codes):
        y = vqvae.decode(z, l).float().cpu()[:, : a.shape[1]]
        err = y - a
        snr = 10 * math.log10(float(a.pow(2).mean()) / max(float(err.pow(2).mean()), 1e-20) + 1e-20)
        sc = float(spectral_convergence(a, y).mean()) if a.shape[1] > 1024 else float("nan")
        out.append(dict(l1=float(err.abs().mean()), l2=float(err.pow(2).mean()), snr_db=snr,
                        spectral_convergence=sc))
    return out


@torch.no_grad()
def codebook_usage(vqvae: VQVAE, audio, batch_size: int = 8) -> list[dict[str, float]]:
    """Per level: ``used`` (distinct codes), ``fraction`` (used / l_bins) and ``perplexity``
    (exp of the code entropy) over audio (N, T) or (T,)."""
    a = _trim(vqvae, audio)
    p = next(vqvae.parameters())
    L, bins = vqvae.config.levels, vqvae.config.l_bins
    counts = torch.zeros(L, bins, dtype=torch.float64)
    for i in range(0, a.shape[0], batch_size):
        codes = vqvae.encode(a[i:i + batch_size].to(p.device, p.dtype))
        for l, z in enumerate(codes):
            counts[l] += torch.bincount(z.reshape(-1).cpu(), minlength=bins).double()
    out = []
    for l in range(L):
        prob = counts[l] / counts[l].sum()
        ent = -(prob * torch.log(prob.clamp(min=1e-30))).sum()
        used = int((counts[l] > 0).sum())
        out.append(dict(used=used, fraction=used / bins, perplexity=float(torch.exp(ent))))
    return out


# --- one call ----------------------------------------------------------------------------------

def train_vqvae(config, pieces: Sequence[Any], train_cfg: TrainConfig, window: int = 44032,
                loss: VQVAELossConfig = VQVAELossConfig(), init: VQVAE | str | None = None,
                data_seed: int | None = None) -> tuple[VQVAE, TrainResult]:
    """Build (or take ``init``: a VQVAE or a path for ``fastjukebox.load_vqvae``) and train a
    VQ-VAE on random ``window``-sample windows of ``pieces`` (arrays, see ``AudioWindows``).

    config: a ``VQVAEConfig``, preset name or JSON path (ignored when ``init`` is given).
    The weights end in ``<train_cfg.out_dir>/vqvae``. Returns (model, result).
    """
    if init is None:
        torch.manual_seed(train_cfg.seed)
        model = VQVAE(resolve_config(config, "vqvae"))
    else:
        model = init if isinstance(init, VQVAE) else load_vqvae(init)
    data = AudioWindows(pieces, window, seed=train_cfg.seed if data_seed is None else data_seed)
    task = VQVAETask(model, data, loss, seed=train_cfg.seed, fresh=init is None)
    result = train(task, train_cfg)
    return model.eval(), result
