"""Ancestral sampling over windows and levels, as the original samples (same distribution).

``sample_levels`` is the original's level loop: top level first, each level in hopped windows of
``n_ctx`` tokens; tokens already known in a window are primed, the rest sampled one by one;
upsamplers read the codes of the level above under their window; labels are re-made per window.
"""
from __future__ import annotations

import time
from functools import lru_cache
from typing import Callable, Mapping, Sequence

import torch

from kernels.sampling.reference import filter_logits, sample_logits_reference

from .decoding import WindowDecoder
from .labels import Labels, get_starts, window_labels
from .prior import Prior
from .progress import progress_bar
from .sample_seeds import SampleGenerators
from .settings import DEFAULT_CHUNK_SIZE, DEFAULT_TEMPERATURE, check_knob
from .vqvae import VQVAE

PerLevel = float | int | Sequence | Mapping


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                  generator: torch.Generator | SampleGenerators | None = None) -> torch.Tensor:
    """Categorical draw from ``softmax(filter(logits / temperature))``, (N, V) -> (N,); temperature
    0 is greedy (the argmax after top-k / top-p).

    Uses ``argmax(p / E)`` with ``E ~ Exp(1)``, an exact categorical sample that needs no host
    round trip (unlike ``torch.multinomial`` on some devices). On CUDA one fused Triton kernel
    (``kernels.sampling``) does it from the same noise; elsewhere the PyTorch reference.
    ``generator``: one for the batch, or ``SampleGenerators`` (row ``i`` drawn from its own)."""
    noise = None
    if isinstance(generator, SampleGenerators):
        noise, generator = generator.exponential_noise(tuple(logits.shape), logits.device), None
    if logits.is_cuda and temperature != 0:     # temperature 0 (greedy): the reference's argmax
        ops = _cuda_sampling()
        if ops is not None and ops.supports(logits):
            return ops.sample_logits(logits, temperature, top_k, top_p, generator, noise=noise)
    return sample_logits_reference(logits, temperature, top_k, top_p, generator, noise=noise)


@lru_cache(maxsize=1)
def _cuda_sampling():
    try:
        from kernels.sampling import ops
    except ImportError:   # no triton: the reference serves CUDA too
        return None
    return ops


def _per_level(value: PerLevel, level: int, name: str):
    if isinstance(value, Mapping):
        if level not in value:
            raise ValueError(f"{name} has no entry for level {level}")
        return value[level]
    if isinstance(value, (list, tuple)):
        return value[level]
    return value


def _labels_for(labels, level: int, prior: Prior) -> Labels | None:
    if not prior.config.labels:
        return None
    if labels is None or (isinstance(labels, Mapping) and level not in labels):
        raise ValueError(f"the level-{level} prior needs labels")
    lab = labels[level] if isinstance(labels, Mapping) else labels
    if not isinstance(lab, Labels):
        lab = Labels.from_y(torch.as_tensor(lab).long(), n_tokens=prior.config.n_tokens)
    if lab.y.shape[1] != prior.config.label_len:
        raise ValueError(f"labels for level {level} have {lab.y.shape[1]} columns, the prior needs "
                         f"{prior.config.label_len}")
    return lab


def check_window_call(known, n_new, temperature, top_k, top_p, config, device) -> torch.Tensor:
    """The arguments of a window sampler's call (``WindowSampler``), checked before any work
    (named errors): returns ``known`` as (N, K) long codes on ``device``."""
    c = config
    if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 0:
        raise ValueError(f"n_new must be an integer >= 0, got {n_new!r}")
    check_knob("temperature", temperature)
    check_knob("top_k", top_k)
    check_knob("top_p", top_p)
    z = torch.as_tensor(known)
    if z.is_floating_point() or z.is_complex() or z.dtype == torch.bool:
        raise ValueError(f"known must be an integer tensor of codes, got {z.dtype}")
    if z.dim() != 2 or z.shape[0] == 0:
        raise ValueError(f"known must be (N, K) codes with N >= 1, got shape {tuple(z.shape)}")
    K = z.shape[1]
    if K + n_new > c.n_ctx:
        raise ValueError(f"{K} known + {n_new} new codes exceed the window (n_ctx={c.n_ctx})")
    z = z.long().to(device)
    if z.numel() and (int(z.min()) < 0 or int(z.max()) >= c.l_bins):
        raise ValueError(f"known codes must be in [0, {c.l_bins}); got values in [{int(z.min())}, {int(z.max())}]")
    return z


REPORT_EVERY = 64   # sampled positions per progress report of a window


def sample_window(decoder: WindowDecoder, known: torch.Tensor, n_new: int, upper=None, labels=None, *,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  generator: torch.Generator | SampleGenerators | None = None,
                  on_progress: Callable[[int], None] | None = None, report_every: int = REPORT_EVERY,
                  run_steps: Callable[[int, dict, Callable[[int], None]], None] | None = None) -> torch.Tensor:
    """Prime ``known`` (N, K) codes, sample ``n_new`` more; returns the window's (N, K + n_new) codes.
    ``on_progress(k)`` is told about every ``report_every`` sampled positions.

    Every token is one ``decoder.step`` and one ``sample_logits`` draw, unless ``run_steps`` is
    given: then the tokens after the first sampled one are ``run_steps(count, knobs, on_step)``, a
    path that takes the decoder's window over (``fast_decode.StaticStepDecoder``), with ``knobs``
    the draw's temperature, top-k, top-p and generator; the first token of a window that starts
    at position 0 reads the start embedding and always takes the decoder's step."""
    known = check_window_call(known, n_new, temperature, top_k, top_p, decoder.config, decoder.device)
    return decode_window(decoder, known, n_new, upper, labels, temperature=temperature, top_k=top_k, top_p=top_p,
                         chunk_size=chunk_size, generator=generator, on_progress=on_progress,
                         report_every=report_every, run_steps=run_steps)


def decode_window(decoder: WindowDecoder, known: torch.Tensor, n_new: int, upper=None, labels=None, *,
                  temperature: float, top_k: int, top_p: float, chunk_size: int, generator, on_progress,
                  report_every: int = REPORT_EVERY, run_steps=None) -> torch.Tensor:
    """``sample_window`` after its arguments were checked (``check_window_call``): for a sampler
    that checks them itself before choosing its decoder."""
    decoder.begin(upper, labels, n=known.shape[0])
    decoder.prime(known, chunk_size)

    def progress(t: int) -> None:
        if on_progress is not None and ((t + 1) % report_every == 0 or t + 1 == n_new):
            on_progress((t % report_every) + 1)

    t = 0
    while t < n_new and (run_steps is None or decoder.seq_position == 0):
        decoder.push(sample_logits(decoder.step(), temperature, top_k, top_p, generator))
        progress(t)
        t += 1
    if t < n_new:
        first = t
        run_steps(n_new - first, dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator),
                  lambda i: progress(first + i))
    return decoder.codes()


class ARWindowSampler:
    """The exact ``"ar"`` window sampler: ``sample_window`` over one reused ``WindowDecoder``.

    Window samplers share this call signature (``fastjukebox.samplers.WindowSampler``;
    ``distill.sampler.ParallelWindowSampler`` too): ``(known (N, K), n_new, upper, labels, *,
    temperature, top_k, top_p, chunk_size, generator, on_progress) -> (N, K + n_new)`` codes."""

    per_sample_generators = True   # takes SampleGenerators: one generator per row

    def __init__(self, prior: Prior, batch: int, device=None):
        self.decoder = WindowDecoder(prior, batch, device=device)

    def __call__(self, known, n_new, upper=None, labels=None, **knobs) -> torch.Tensor:
        return sample_window(self.decoder, known, n_new, upper, labels, **knobs)


def level_windows(total: int, n_ctx: int, hop: int, have: int) -> list[tuple[int, int, int]]:
    """(start, known, new) per window that has something to sample, as the original walks them.

    A level shorter than ``n_ctx`` is one partial window."""
    out = []
    if total < n_ctx:
        if have < total:
            out.append((0, have, total - have))
        return out
    for start in get_starts(total, n_ctx, hop):
        known = max(0, min(have, start + n_ctx) - start)
        if known < n_ctx:
            out.append((start, known, n_ctx - known))
            have = start + n_ctx
    return out


def sample_levels(vqvae: VQVAE | None, priors: Mapping[int, Prior], labels, sample_length: int, *,
                  codes: Sequence[torch.Tensor | None] | None = None, levels: Sequence[int] = (2, 1, 0),
                  hop_fraction: Sequence[float] = (0.5, 0.5, 0.125), chunk_size: PerLevel = DEFAULT_CHUNK_SIZE,
                  temperature: PerLevel = DEFAULT_TEMPERATURE, top_k: PerLevel = 0, top_p: PerLevel = 0.0,
                  max_batch_size: int = 16, seed: int | None = None, progress: bool = True,
                  decoders: dict | None = None,
                  window_samplers: Mapping[int, Callable[..., torch.Tensor]] | None = None,
                  sample_seeds: Sequence[int] | None = None,
                  level_seconds: dict[int, float] | None = None) -> list[torch.Tensor]:
    """Sample ``levels`` (top first) of ``sample_length`` audio samples.

    Args:
        vqvae: only used for its geometry checks (may be None).
        priors: level -> Prior.
        labels: level -> ``Labels`` or initial label rows (N, label_len), as before the per-window
            adjustment; one value is used for every level.
        codes: known codes per level, level 0 first (None or (N, 0) for nothing), to continue from.
        hop_fraction, chunk_size, temperature, top_k, top_p: per level (indexed by level) or one
            value for all.
        max_batch_size: samples decoded together; larger batches are split.
        seed: makes the run reproducible.
        decoders: optional cache of ``ARWindowSampler`` keyed by (level, batch), reused across calls.
        window_samplers: level -> a window sampler to use instead of exact autoregressive
            sampling (``fastjukebox.samplers.WindowSampler``, e.g.
            ``distill.sampler.ParallelWindowSampler``).
        sample_seeds: one seed per sample (``sample_seeds.sample_seed``): each sample draws from its
            own generator, so its codes do not depend on the other samples of the batch (``seed`` is
            then unused). ``"ar"`` levels still decode the batch together; other window samplers
            take the samples one at a time unless they take ``SampleGenerators``
            (``per_sample_generators``).
        level_seconds: filled with each sampled level's wall time in seconds (its windows, the
            device synchronised at the end of the level).
    Returns:
        codes per level, level 0 first (levels not sampled are returned as given, or None).
    """
    n_levels = max(priors) + 1 if vqvae is None else vqvae.config.levels
    zs: list[torch.Tensor | None] = list(codes) if codes is not None else [None] * n_levels
    if len(zs) != n_levels:
        raise ValueError(f"codes must list {n_levels} levels (level 0 first), got {len(zs)}")
    n = _batch_size(zs, labels, priors)
    first = priors[levels[0]] if levels else None
    device = first.device if first is not None else torch.device("cpu")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    rows = None
    if sample_seeds is not None:
        if len(sample_seeds) != n:
            raise ValueError(f"{len(sample_seeds)} sample seeds for {n} samples")
        rows = SampleGenerators(sample_seeds, device)
    decoders = {} if decoders is None else decoders
    per_level_knobs = {level: {name: check_knob(name, _per_level(value, level, name), level) for name, value in
                               (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                                ("chunk_size", chunk_size))} for level in levels}   # all, before any sampling
    for level in sorted(levels, reverse=True):
        if level not in priors:
            raise ValueError(f"no prior for level {level}")
        prior = priors[level]
        c = prior.config
        if sample_length % c.raw_to_tokens:
            raise ValueError(f"sample_length {sample_length} must be a multiple of {c.raw_to_tokens} "
                             f"(level {level}'s samples per code)")
        total = sample_length // c.raw_to_tokens
        if not c.is_top:
            if total < c.n_ctx:
                raise ValueError(f"sample_length {sample_length} is too short for the level-{level} upsampler: "
                                 f"it needs at least {c.sample_length} samples ({c.sample_length / c.sr:.2f} s)")
            up = zs[level + 1]
            need = total // c.cond_downsample
            if up is None or up.shape[1] < need:
                raise ValueError(f"level {level} needs {need} level-{level + 1} codes; have "
                                 f"{0 if up is None else up.shape[1]}")
        z = zs[level]
        z = torch.zeros(n, 0, dtype=torch.long, device=device) if z is None else torch.as_tensor(z).long().to(device)
        if z.shape[0] != n:
            raise ValueError(f"level-{level} codes have batch {z.shape[0]}, expected {n}")
        if z.shape[1] > total:
            raise ValueError(f"level-{level} codes are longer ({z.shape[1]}) than the sample ({total})")
        lab = _labels_for(labels, level, prior)
        hop = int(_per_level(hop_fraction, level, "hop_fraction") * c.n_ctx)
        windows = level_windows(total, c.n_ctx, hop, z.shape[1])
        knobs = dict(per_level_knobs[level], generator=gen)
        bar = progress_bar(sum(w[2] for w in windows) * n, f"level {level}", "tok",
                           enabled=progress and bool(windows), leave=False)
        bs = min(n, max_batch_size)
        began = time.perf_counter()
        if window_samplers is not None and level in window_samplers:
            fill = window_samplers[level]
        else:
            if (level, bs) not in decoders:
                decoders[level, bs] = ARWindowSampler(prior, bs, device=device)
            fill = decoders[level, bs]
        for w, (start, known, new) in enumerate(windows):
            bar.set_postfix_str(f"window {w + 1}/{len(windows)}")
            end = start + c.n_ctx
            y = None if lab is None else window_labels(lab, start, c.raw_to_tokens, c.sample_length).to(device)
            upper = None if c.is_top else zs[level + 1][:, start // c.cond_downsample:end // c.cond_downsample]
            parts = []
            for i in range(0, n, bs):
                sl = slice(i, i + bs)
                for part, part_knobs in _row_groups(sl, n, fill, rows, knobs):
                    parts.append(fill(
                        z[part, start:start + known], new,
                        None if upper is None else upper[part].to(device), None if y is None else y[part],
                        on_progress=lambda k, r=len(range(*part.indices(n))): bar.update(k * r), **part_knobs))
            window = torch.cat(parts, dim=0)
            note = getattr(fill, "progress_note", None)     # e.g. the speculative sampler's acceptance
            if note is not None:
                bar.set_postfix_str(f"window {w + 1}/{len(windows)} {note()}".rstrip())
            z = torch.cat([z, window[:, known:]], dim=1)
        bar.close()
        zs[level] = z
        if level_seconds is not None:
            if z.is_cuda:
                torch.cuda.synchronize(z.device)
            level_seconds[level] = time.perf_counter() - began
    return zs


def _row_groups(sl: slice, n: int, fill, rows: SampleGenerators | None, knobs: dict):
    """(rows, knobs) of the calls that decode batch slice ``sl``: the slice at once with the run's
    generator or the rows' own (window samplers with ``per_sample_generators``), else row by row
    with each row's generator."""
    if rows is None:
        return [(sl, knobs)]
    if getattr(fill, "per_sample_generators", False):
        return [(sl, dict(knobs, generator=rows[sl]))]
    return [(slice(r, r + 1), dict(knobs, generator=rows.generators[r])) for r in range(*sl.indices(n))]


def _batch_size(zs, labels, priors) -> int:
    for z in zs:
        if z is not None:
            return torch.as_tensor(z).shape[0]
    lab = labels
    if isinstance(labels, Mapping):
        lab = next(iter(labels.values()), None) if labels else None
    if isinstance(lab, Labels):
        return lab.y.shape[0]
    if lab is not None:
        return torch.as_tensor(lab).shape[0]
    raise ValueError("cannot tell the number of samples: pass labels or codes")
