"""Shapes of the sampling benchmarks: small priors with random weights, shaped like the upsamplers.

A case names a prior architecture, how many tokens each method samples and the batch sizes to
time, and how many of the window's codes are known before sampling starts. ``build_prior`` makes the model (seeded, eval mode, no gradients) and ``window_inputs``
one window's conditioning inputs (codes of the level above and a label row).

The released level-0 upsampler is ``n_ctx=8192, width=1920, depth=72, blocks=128``; the cases
here keep its layer pattern (``attn_order=2``: block, transpose, previous-block), its single
head and its conditioner layout, scaled down so one measurement takes seconds on one CPU thread.

``init_scale=5`` (weights drawn with std 0.1 instead of 0.02) makes the random model's choices
depend on its attention and conditioning: at the default scale the residual stream is dominated
by the input embedding, greedy decoding falls into a short loop that is the same for every
sample, and a baseline that read the wrong keys would still produce the same tokens. Timings
do not depend on the weights' values.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fastjukebox.config import PriorConfig
from fastjukebox.prior import Prior

__all__ = ["SamplingCase", "CASES", "DEFAULT_CASE", "QUICK_CASE", "build_prior", "window_inputs"]

UPSAMPLER_SMALL = PriorConfig(
    level=0, n_ctx=1024, width=256, depth=6, heads=1, attn_order=2, blocks=16, l_bins=256,
    cond_width=64, cond_depth=2, cond_dilation_growth_rate=3, cond_dilation_cycle=8, cond_c_res=True,
    y_bins=(10, 20), t_bins=32, max_bow_genre_size=5, init_scale=5.0,
)


@dataclass(frozen=True)
class SamplingCase:
    """One benchmark shape.

    n_new: tokens every method samples (the timed part).
    known: codes already in the window before sampling (primed, untimed), as in every window
        after a level's first: the upsamplers hop by half a window (the top level by 1/8), so
        from the second window on half of an upsampler's window is known.
    batches: batch sizes timed.
    methods: the methods compared (full recompute is left out where it would take hours).
    seed: seeds the weights, the window's inputs and the sampling generator.
    """

    name: str
    config: PriorConfig
    n_new: int
    known: int = 0
    batches: tuple[int, ...] = (1, 16)
    methods: tuple[str, ...] = ("ours", "original_style", "growing_cache", "full_recompute")
    seed: int = 0

    def describe(self) -> dict:
        c = self.config
        return {"case": self.name, "level": c.level, "n_ctx": c.n_ctx, "width": c.width, "depth": c.depth,
                "heads": c.heads, "attn_order": c.attn_order, "blocks": c.blocks, "block_len": c.block_len,
                "n_state": c.n_state, "l_bins": c.l_bins, "cond_width": c.cond_width,
                "cond_depth": c.cond_depth, "n_new": self.n_new, "known": self.known,
                "batches": list(self.batches), "methods": list(self.methods)}


# The released upsamplers' context and block structure (n_ctx 8192, blocks 128 of 64 tokens), at
# the width of UPSAMPLER_SMALL.
UPSAMPLER_8K = replace(UPSAMPLER_SMALL, n_ctx=8192, blocks=128)
CACHED_METHODS = ("ours", "original_style", "growing_cache")

CASES: dict[str, SamplingCase] = {
    # 256 tokens = 4 blocks of 64: every pattern's cache logic is exercised (block 0's empty
    # previous block, block changes, transpose columns growing to 4 keys).
    "upsampler_small": SamplingCase("upsampler_small", UPSAMPLER_SMALL, n_new=256),
    # The same model, fewer tokens: for --quick runs and the pytest-benchmark file.
    "upsampler_small_quick": SamplingCase("upsampler_small_quick", UPSAMPLER_SMALL, n_new=128),
    # Greedy-equivalence check: crosses two block boundaries, cheap enough for plain pytest.
    "upsampler_small_check": SamplingCase("upsampler_small_check", UPSAMPLER_SMALL, n_new=160, batches=(1, 4)),
    # An upsampler window in steady state: the first half of n_ctx known (primed from the
    # previous window), the whole second half (4096 tokens) sampled and timed. The original's
    # cost per token grows across it (its caches are copied whole at every step), ours barely.
    "upsampler_8k_primed": SamplingCase("upsampler_8k_primed", UPSAMPLER_8K, n_new=4096, known=4096,
                                        methods=CACHED_METHODS),
    "upsampler_8k_primed_quick": SamplingCase("upsampler_8k_primed_quick", UPSAMPLER_8K, n_new=32, known=4096,
                                              methods=CACHED_METHODS),
    # Primed equivalence check: known codes end mid-block, sampling crosses a block boundary.
    "upsampler_primed_check": SamplingCase("upsampler_primed_check", UPSAMPLER_SMALL, n_new=72, known=900,
                                           batches=(1, 3), methods=CACHED_METHODS),
}
DEFAULT_CASE = "upsampler_small"
QUICK_CASE = "upsampler_small_quick"


def build_prior(case: SamplingCase, dtype: torch.dtype = torch.float32) -> Prior:
    """The case's prior with random (seeded) weights, in eval mode, without gradients."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(case.seed)
        prior = Prior(case.config)
    finally:
        torch.random.set_rng_state(state)
    return prior.to(dtype).eval().requires_grad_(False)


def window_inputs(case: SamplingCase, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of the level above under one window, ``(batch, n_ctx // cond_downsample)``, a
    label row per sample, ``(batch, label_len)`` (artist, two genres, unused genre slots -1), and
    the window's known codes ``(batch, case.known)``."""
    c = case.config
    g = torch.Generator().manual_seed(case.seed + 1)
    upper = torch.randint(0, c.l_bins, (batch, c.n_ctx // c.cond_downsample), generator=g)
    genres, artists = c.y_bins
    labels = torch.full((batch, c.label_len), -1, dtype=torch.long)
    labels[:, 0] = 4 * c.sample_length                       # total length (samples)
    labels[:, 1] = 0                                         # offset of the window
    labels[:, 2] = c.sample_length                           # window length
    labels[:, 3] = torch.randint(0, artists, (batch,), generator=g)
    labels[:, 4:6] = torch.randint(0, genres, (batch, 2), generator=g)
    known = torch.randint(0, c.l_bins, (batch, case.known), generator=g)
    return upper, labels, known
