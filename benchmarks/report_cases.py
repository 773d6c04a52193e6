"""What the speed report times: one level's window for each sampler, VQ-VAE decoding, and the timer.

Every measurement is a ``prepare() -> run()`` pair: ``prepare`` does the untimed part (window
inputs, conditioning, priming known codes), ``run`` the timed part. ``measure`` calls ``prepare``
then times ``run`` (``time.perf_counter``, CUDA synchronised) for a warm-up and ``rounds`` rounds.

Window shapes follow the original's level loop in steady state: a level's window of ``n_ctx``
codes hops by ``hop_fraction[level] * n_ctx`` (``HOP_FRACTION``: 0.5 for levels 0 and 1, 0.125 for
the top level 2, as ``fastjukebox.sampling.sample_levels``), so every window after the first knows
``n_ctx - hop`` codes and samples ``hop`` new ones.

* ``ar_runner``: autoregressive sampling of ``n_new`` tokens after ``known`` primed ones, with
  ``ours`` (``fastjukebox.decoding.WindowDecoder``, static cache; on CUDA the Triton kernels
  serve its attention) or ``original_style`` (``benchmarks.original_style.OriginalStyleSampler``).
* ``setup_runner``: one window's conditioning and priming of its known codes (``WindowDecoder``).
* ``student_runner``: one whole window of ``distill.sampler.ParallelWindowSampler`` (``passes``
  full-window student evaluations, conditioning included).
* ``decode_runner``: ``VQVAE.decode`` of level-0 codes.

Inputs are random codes and valid label rows; speed does not depend on their values.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from fastjukebox.attention import layer_patterns
from fastjukebox.config import PriorConfig
from fastjukebox.decoding import WindowDecoder
from fastjukebox.prior import Prior
from fastjukebox.sampling import sample_logits
from fastjukebox.settings import DEFAULT_TEMPERATURE

__all__ = ["HOP_FRACTION", "KNOBS", "LevelGeometry", "geometry", "level_inputs", "ar_runner", "setup_runner",
           "student_runner", "decode_runner", "measure", "Timing", "roofline_tokens_per_s", "HBM_BANDWIDTH",
           "hbm_bandwidth"]

HOP_FRACTION = (0.5, 0.5, 0.125)     # indexed by level (sample_levels' default): the top level hops 1/8
KNOBS = dict(temperature=DEFAULT_TEMPERATURE, top_k=0, top_p=0.0)   # the original's upsampler default
AR_METHODS = ("ours", "original_style")

Prepare = Callable[[], Callable[[], torch.Tensor]]


@dataclass(frozen=True)
class LevelGeometry:
    """How one level covers a minute of audio.

    tokens_per_minute: ``60 * sr / hop_length(level)``.
    hop_tokens: new codes per window (``hop_fraction * n_ctx``); known = ``n_ctx - hop_tokens``.
    windows_per_minute: ``tokens_per_minute / hop_tokens`` (steady state, fractional).
    """

    level: int
    n_ctx: int
    hop_length: int
    tokens_per_minute: float
    hop_tokens: int
    known: int
    windows_per_minute: float


def geometry(config: PriorConfig, hop_length: int) -> LevelGeometry:
    hop = max(1, int(HOP_FRACTION[config.level] * config.n_ctx))
    tpm = 60.0 * config.sr / hop_length
    return LevelGeometry(config.level, config.n_ctx, hop_length, tpm, hop, config.n_ctx - hop, tpm / hop)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def level_inputs(config: PriorConfig, batch: int, known: int, device, seed: int = 0):
    """Random inputs of one window: upper codes ``(batch, n_ctx // cond_downsample)`` (None for
    the top level), label rows ``(batch, label_len)`` (None without labels) and known codes
    ``(batch, known)``."""
    c = config
    g = torch.Generator().manual_seed(seed + 1)
    upper = None
    if not c.is_top:
        upper = torch.randint(0, c.l_bins, (batch, c.n_ctx // c.cond_downsample), generator=g).to(device)
    labels = None
    if c.labels:
        genres, artists = c.y_bins
        total = 4 * c.sample_length
        if c.max_duration:
            total = min(total, int(c.max_duration * c.sr))
        if c.min_duration:
            total = max(total, int(c.min_duration * c.sr) + c.sample_length)
        labels = torch.full((batch, c.label_len), -1, dtype=torch.long)
        labels[:, 0], labels[:, 1], labels[:, 2] = total, 0, c.sample_length
        labels[:, 3] = torch.randint(0, artists, (batch,), generator=g)
        labels[:, 4:6 if c.max_bow_genre_size > 1 else 5] = torch.randint(
            0, genres, (batch, min(2, c.max_bow_genre_size)), generator=g)
        if c.n_tokens:
            labels[:, 4 + c.max_bow_genre_size:] = torch.randint(1, c.n_vocab, (batch, c.n_tokens), generator=g)
        labels = labels.to(device)
    codes = torch.randint(0, c.l_bins, (batch, known), generator=g).to(device)
    return upper, labels, codes


def ar_runner(method: str, prior: Prior, batch: int, known: int, n_new: int, seed: int = 0) -> Prepare:
    """``prepare() -> run()``: ``run`` samples ``n_new`` tokens (batch, n_new) after ``known`` primed
    codes with ``method`` (``ours`` or ``original_style``); state kept across windows (the decoder
    and its cache, the baseline's modules) is built once here."""
    if method not in AR_METHODS:
        raise ValueError(f"unknown autoregressive method {method!r}; expected one of {AR_METHODS}")
    c = prior.config
    if known + n_new > c.n_ctx:
        raise ValueError(f"{known} known + {n_new} new tokens exceed the window (n_ctx={c.n_ctx})")
    device = _device(prior)
    upper, labels, codes = level_inputs(c, batch, known, device, seed)
    if method == "ours":
        decoder = WindowDecoder(prior, batch)

        def prepare():
            decoder.begin(upper, labels)
            decoder.prime(codes)
            g = torch.Generator(device=device).manual_seed(seed)

            def run():
                for _ in range(n_new):
                    decoder.push(sample_logits(decoder.step(), generator=g, **KNOBS))
                return decoder.codes()[:, known:]
            return run
        return prepare
    from .original_style import OriginalStyleSampler
    sampler = OriginalStyleSampler(prior)

    def prepare_original():
        with torch.no_grad():
            sampler.start(prior.condition(upper, labels), codes)
        return lambda: sampler.sample(n_new, seed=seed, **KNOBS)
    return prepare_original


def setup_runner(prior: Prior, batch: int, known: int, seed: int = 0) -> Prepare:
    """``run`` conditions one window and primes its ``known`` codes into a ``WindowDecoder``."""
    device = _device(prior)
    upper, labels, codes = level_inputs(prior.config, batch, known, device, seed)
    decoder = WindowDecoder(prior, batch)

    def run():
        decoder.begin(upper, labels)
        decoder.prime(codes)
        return decoder.codes()
    return lambda: run


def student_runner(student, passes: int, batch: int, known: int, n_new: int, seed: int = 0,
                   prefix_cache: bool | None = None) -> Prepare:
    """``run`` decodes one window (``known`` codes kept, ``n_new`` filled) with a
    ``ParallelWindowSampler`` of ``passes`` passes (``prefix_cache`` None: the student's own
    layout); returns (batch, known + n_new) codes."""
    from distill.sampler import ParallelWindowSampler
    sampler = ParallelWindowSampler(student, passes=passes, prefix_cache=prefix_cache)
    device = _device(student)
    upper, labels, codes = level_inputs(student.config, batch, known, device, seed)

    def prepare():
        g = torch.Generator(device=device).manual_seed(seed)
        return lambda: sampler(codes, n_new, upper, labels, generator=g, **KNOBS)
    return prepare


def decode_runner(vqvae, batch: int, n_codes: int, seed: int = 0) -> Prepare:
    """``run`` decodes (batch, n_codes) random level-0 codes to audio (batch, n_codes * hop)."""
    g = torch.Generator().manual_seed(seed + 2)
    codes = torch.randint(0, vqvae.config.l_bins, (batch, n_codes), generator=g).to(_device(vqvae))
    return lambda: (lambda: vqvae.decode(codes, 0))


@dataclass
class Timing:
    """Seconds of each timed round (warm-up excluded) and their median."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(prepare: Prepare, rounds: int, warmup: int = 1, device: torch.device | None = None) -> Timing:
    """Time ``run`` of ``rounds`` fresh ``prepare()`` calls after ``warmup`` untimed ones."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    out = []
    for r in range(warmup + rounds):
        run = prepare()
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        if r >= warmup:
            out.append(time.perf_counter() - t0)
    return Timing(out)


# --- HBM roofline of one autoregressive step --------------------------------------------------
# Peak memory bandwidth (bytes/s) of the GPUs the report knows, matched on the device name.
HBM_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12,
                 "A100": 1.555e12, "L40S": 0.864e12, "A10G": 0.6e12, "RTX 4090": 1.008e12}


def hbm_bandwidth(device_name: str) -> float | None:
    """Peak HBM bandwidth (bytes/s) for a ``torch.cuda.get_device_name`` string, None if unknown."""
    for key, bw in HBM_BANDWIDTH.items():
        if key.lower() in device_name.lower():
            return bw
    return None


def _mean_keys(pattern: str, c: PriorConfig) -> float:
    """Keys one step of a layer reads, averaged over the window's positions."""
    C, nb = c.block_len, c.seq_len // c.block_len
    return {"block": (C + 1) / 2, "prev_block": C * (nb - 1) / nb, "transpose": (nb + 1) / 2,
            "dense": (c.seq_len + 1) / 2, "prime": c.prime_len or 0, "cross": c.encoder_len}.get(pattern, 0)


def roofline_tokens_per_s(prior: Prior, batch: int, bandwidth: float) -> dict:
    """Tokens/s (all samples) if one decode step only had to read, once, every transformer and
    head weight plus the keys and values its attention needs, at ``bandwidth`` bytes/s. Weights
    are read once per step whatever the batch; cache reads scale with the batch."""
    c = prior.config
    tm = prior.prior
    item = next(prior.parameters()).element_size()
    weights = sum(p.numel() for p in tm.transformer.parameters()) * item + c.bins * c.width * item
    keys = sum(_mean_keys(p, c) for p in layer_patterns(c.attn_order, c.depth))
    cache = 2 * keys * c.n_state * item * batch
    step_s = (weights + cache) / bandwidth
    return {"bytes_per_step": int(weights + cache), "weight_bytes": int(weights), "cache_bytes": int(cache),
            "tokens_per_s": batch / step_s}
