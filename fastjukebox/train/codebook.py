"""Codebook learning by exponential moving averages (k-means online), with dead-code restarts.

The codebooks are the VQ-VAE's buffers ``bottleneck.level_blocks.{l}.k`` (l_bins, emb_width); no
gradient reaches them. Per level this state keeps

* ``k_sum`` (l_bins, emb_width): EMA of the sum of encoder vectors assigned to each code;
* ``k_elem`` (l_bins,): EMA of how many vectors each code received;

and after every batch sets ``k = k_sum / k_elem`` for live codes. A code whose ``k_elem`` fell
below ``threshold`` is dead: it is moved onto a random encoder vector of the current batch and its
statistics restart as if it had received ``threshold`` vectors there.

The state lives here, outside the module, so the VQ-VAE's state dict keeps the released keys.
"""
from __future__ import annotations

import math

import torch

__all__ = ["CodebookEMA"]


class CodebookEMA:
    def __init__(self, vqvae, mu: float = 0.99, threshold: float = 1.0, init_from_data: bool = True):
        """``init_from_data``: the first batch seen at each level replaces the codebook with random
        encoder vectors (fresh models). ``False`` starts the statistics from the current codebook
        (fine-tuning a trained VQ-VAE)."""
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"mu must be in [0, 1), got {mu}")
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.vqvae, self.mu, self.threshold = vqvae, float(mu), float(threshold)
        c = vqvae.config
        k0 = vqvae.bottleneck.level_blocks[0].k
        self.k_sum = torch.stack([b.k.detach().float().clone() * threshold for b in vqvae.bottleneck.level_blocks])
        self.k_elem = torch.full((c.levels, c.l_bins), float(threshold), device=k0.device)
        self.initialised = torch.full((c.levels,), not init_from_data, dtype=torch.bool)

    def codebook(self, level: int) -> torch.Tensor:
        return self.vqvae.bottleneck.level_blocks[level].k

    def _candidates(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """l_bins random rows of x (N, C); x is tiled with small noise when it has fewer rows."""
        n, C = x.shape
        l_bins = self.k_sum.shape[1]
        if n < l_bins:
            reps = -(-l_bins // n)
            noise = torch.randn(reps * n, C, generator=generator, device="cpu").to(x.device)
            x = x.repeat(reps, 1) + noise * (0.01 / math.sqrt(C))
        perm = torch.randperm(x.shape[0], generator=generator, device="cpu")[:l_bins].to(x.device)
        return x[perm]

    @torch.no_grad()
    def maybe_init(self, level: int, x: torch.Tensor, generator: torch.Generator) -> bool:
        """Before quantising the first batch of a fresh codebook: set it to random rows of
        x (N, emb_width). Returns whether it did."""
        if bool(self.initialised[level]):
            return False
        x = x.detach().float()
        if self.k_sum.device != x.device:
            self.k_sum, self.k_elem = self.k_sum.to(x.device), self.k_elem.to(x.device)
        init = self._candidates(x, generator)
        self.k_sum[level] = init * self.threshold
        self.k_elem[level] = self.threshold
        k = self.codebook(level)
        k.copy_(init.to(k.dtype))
        self.initialised[level] = True
        return True

    @torch.no_grad()
    def update(self, level: int, x: torch.Tensor, codes: torch.Tensor, generator: torch.Generator
               ) -> dict[str, torch.Tensor]:
        """x: (N, emb_width) float encoder vectors of this batch, codes: (N,) their nearest codes.

        Writes the new codebook into the module and returns metrics: ``entropy`` (nats) and
        ``used_curr`` of this batch's assignments, ``usage`` (live codes after the update),
        ``restarted`` (codes moved) and ``dk`` (RMS codebook change).
        """
        x = x.detach().float()
        k = self.codebook(level)
        l_bins = k.shape[0]
        if self.k_sum.device != x.device:
            self.k_sum, self.k_elem = self.k_sum.to(x.device), self.k_elem.to(x.device)
        count = torch.bincount(codes.reshape(-1), minlength=l_bins).to(x.dtype)             # (l_bins,)
        total = torch.zeros_like(self.k_sum[level]).index_add_(0, codes.reshape(-1), x)       # (l_bins, C)
        old = k.detach().float().clone()
        self.k_sum[level].mul_(self.mu).add_(total, alpha=1.0 - self.mu)
        self.k_elem[level].mul_(self.mu).add_(count, alpha=1.0 - self.mu)
        live = self.k_elem[level] >= self.threshold                                          # (l_bins,)
        rand = self._candidates(x, generator)
        dead = ~live
        self.k_sum[level][dead] = rand[dead] * self.threshold
        self.k_elem[level][dead] = self.threshold
        new = self.k_sum[level] / self.k_elem[level][:, None]
        k.copy_(new.to(k.dtype))
        prob = count / count.sum()
        entropy = -(prob * torch.log(prob + 1e-8)).sum()
        return dict(entropy=entropy, used_curr=(count > 0).sum().float(), usage=live.sum().float(),
                    restarted=dead.sum().float(), dk=(new - old).norm() / math.sqrt(old.numel()))

    # --- checkpoint state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"k_sum": self.k_sum.detach().cpu().clone(), "k_elem": self.k_elem.detach().cpu().clone(),
                "initialised": self.initialised.clone(),
                "mu": torch.tensor(self.mu, dtype=torch.float64),
                "threshold": torch.tensor(self.threshold, dtype=torch.float64)}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for name in ("k_sum", "k_elem", "initialised"):
            if name not in sd:
                raise ValueError(f"codebook state lacks {name!r}")
        if tuple(sd["k_sum"].shape) != tuple(self.k_sum.shape):
            raise ValueError(f"codebook state has shape {tuple(sd['k_sum'].shape)}, this VQ-VAE needs "
                             f"{tuple(self.k_sum.shape)}")
        dev = self.k_sum.device
        self.k_sum = sd["k_sum"].to(dev, torch.float32).clone()
        self.k_elem = sd["k_elem"].to(dev, torch.float32).clone()
        self.initialised = sd["initialised"].to(torch.bool).cpu().clone()
