"""The fast path of exact sampling: a decode step whose position lives on the device.

``StaticStepDecoder`` continues the window of a ``WindowDecoder`` (same key/value cache, same token
buffer) with a one-token step that never reads the position on the host. The position is a 0-d
long tensor; inputs are gathered with ``index_select`` from the position embedding and the
window's conditioning, keys/values go into the cache with ``index_copy_`` at slots computed on the
device, attention reads the whole static cache under masks computed from the position, and the
sampled ids are written into the token buffer before the position is incremented, all on the
device. Every tensor the step touches has a fixed address and shape, so on CUDA the step is recorded
once into a ``torch.cuda.CUDAGraph`` per (batch, knobs) and replayed at every position; on the CPU
the same function runs eagerly::

    dec = WindowDecoder(prior, batch=4)
    dec.begin(upper, labels); dec.prime(known)       # eager, chunked (position 0 too)
    fast = StaticStepDecoder(dec)
    fast.bind(temperature=0.98, generator=gen)       # this window's conditioning and position
    fast.run(n_new)                                  # replay (CUDA graphs) or eager steps
    codes = dec.codes()

Noise. The Exp(1) noise of a step, ``(n, bins)`` fp32, is drawn with the caller's generator into a
static buffer right before the step body runs, eagerly and outside any captured graph. It is the
draw ``fastjukebox.sampling.sample_logits`` makes, so a window consumes the generator exactly as
``ARWindowSampler`` does, and any generator works under graphs (none needs registering with the
graph); the price is one small kernel launch per step beside the replay.

Flags.
- ``backend``: ``"triton"`` (the Triton decode-attention and sampling kernels; CUDA only),
  ``"reference"`` (``kernels.decode_attention.masked`` and PyTorch sampling) or ``"auto"``
  (Triton on CUDA when importable and the dtype is supported, the references elsewhere). ``None``
  follows ``fastjukebox.attention.set_backend`` / ``FASTJUKEBOX_ATTENTION``, where ``reference``
  forces the references and any other value means ``auto``.
- ``cuda_graphs``: ``None`` follows ``FASTJUKEBOX_CUDA_GRAPHS`` (``0`` | ``1``; unset: on for
  CUDA). Graphs are always off on the CPU; asking for them there explicitly is an error.

Weights are used in their loaded dtype (``fastjukebox.load(..., dtype=torch.bfloat16)`` converts
them once); the only per-step casts are of activations (fp32 LayerNorm and attention statistics).
Each layer is ``block_forward.block_forward`` (LayerNorm parameters in fp32 for half weights, read
once when the decoder is built).

The sampler ``GraphWindowSampler`` (registered as ``"ar-graph"`` in ``fastjukebox.generate``) has
``ARWindowSampler``'s call signature and draws the same tokens from the same generator.
"""
from __future__ import annotations

import inspect
import os
from typing import Callable

import torch

from kernels.decode_attention.masked import MASKED_PATTERNS, decode_attention_masked
from kernels.sampling.reference import exponential_noise_, sample_logits_reference

from . import attention as _attention
from .decoding import WindowDecoder
from .block_forward import BlockWeights, block_forward, layer_table
from .kv_cache import slot_index
from .prior import Prior
from .sample_seeds import SampleGenerators, fill_rows
from .sampling import check_window_call, decode_window, sample_window

__all__ = ["StaticStepDecoder", "GraphWindowSampler", "cuda_graphs_enabled", "resolve_backend", "GRAPHS_ENV"]

GRAPHS_ENV = "FASTJUKEBOX_CUDA_GRAPHS"
BACKENDS = ("auto", "triton", "reference")


def cuda_graphs_enabled(device: torch.device | str, requested: bool | None = None) -> bool:
    """Whether steps on ``device`` are replayed from CUDA graphs.

    ``requested`` True/False decides (True on a non-CUDA device is an error); ``None`` reads
    ``FASTJUKEBOX_CUDA_GRAPHS`` (``0`` | ``1``; unset means on), which applies to CUDA only."""
    cuda = torch.device(device).type == "cuda"
    if requested is None:
        text = os.environ.get(GRAPHS_ENV, "").strip()
        if text not in ("", "0", "1"):
            raise ValueError(f"{GRAPHS_ENV} must be 0 or 1, got {text!r}")
        return cuda and text != "0"
    if requested and not cuda:
        raise ValueError(f"CUDA graphs need a CUDA device; the decoder is on {torch.device(device)}")
    return bool(requested)


def _triton_ops():
    """(decode_attention, decode supports, sample_logits, sample supports) or None without Triton."""
    try:
        from kernels.decode_attention.ops import decode_attention, supports as attn_ok
        from kernels.sampling.ops import sample_logits as sample_fused, supports as sample_ok
    except ImportError:
        return None
    return decode_attention, attn_ok, sample_fused, sample_ok


def resolve_backend(device: torch.device | str, requested: str | None = None) -> str:
    """``"triton"`` or ``"reference"`` for a step on ``device`` (see the module docstring)."""
    cuda = torch.device(device).type == "cuda"
    if requested is None:
        name = _attention.backend_name()
        name = "reference" if name == "reference" else "auto"
    elif requested not in BACKENDS:
        raise ValueError(f"unknown fast-decode backend {requested!r}; known: {', '.join(BACKENDS)}")
    else:
        name = requested
    if name == "reference":
        return "reference"
    if name == "triton":
        if not cuda:
            raise ValueError(f"the Triton backend needs a CUDA device; the decoder is on {torch.device(device)}")
        if _triton_ops() is None:
            raise ValueError("the Triton backend needs the triton package")
        return "triton"
    return "triton" if cuda and _triton_ops() is not None else "reference"


class StaticStepDecoder:
    """One-token steps of a ``WindowDecoder``'s window with all state on the device.

    Static buffers (batch ``B`` of the decoder, ``n <= B`` samples in the bound window):
    ``pos`` 0-d long, the sequence position of the next step; ``logits`` (n, bins) of the last
    step (pre-temperature, model dtype); ``ids`` (n,) its chosen ids (merged ids for merged-lyric
    priors, as ``WindowDecoder.push`` takes them); the noise (n, bins) fp32; the window's x_cond
    (n, seq_len, W). The previous ids are read from the decoder's token buffer.
    """

    def __init__(self, decoder: WindowDecoder, *, backend: str | None = None, cuda_graphs: bool | None = None):
        c = decoder.config
        unsupported = sorted(set(decoder.cache.patterns) - set(MASKED_PATTERNS))
        if unsupported:
            raise NotImplementedError(f"the fast decode step does not support {', '.join(unsupported)} layers")
        self.decoder, self.config, self.tm = decoder, c, decoder.prior.prior
        self.device, self.dtype, B = torch.device(decoder.device), decoder.dtype, decoder.batch
        if self.tm.x_emb.weight.dtype != self.dtype:
            raise ValueError(f"the decoder's cache is {self.dtype} but the weights are {self.tm.x_emb.weight.dtype}; "
                             "load the prior in the dtype to decode in (weights are never cast per step)")
        self.backend = resolve_backend(self.device, backend)
        self.use_graphs = cuda_graphs_enabled(self.device, cuda_graphs)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.pos = torch.zeros((), dtype=torch.long, device=self.device)
        self._logits = torch.zeros(B, c.bins, dtype=self.dtype, device=self.device)
        self._ids = torch.zeros(B, dtype=torch.long, device=self.device)
        self._noise = torch.ones(B, c.bins, **f32)
        self._x_cond: torch.Tensor | None = None          # (B, seq_len, W), with the first window that has one
        self._layers = layer_table(self.tm.transformer)
        self._attend, self._fused_sample = decode_attention_masked, None
        if self.backend == "triton":
            attn, attn_ok, sample_fused, sample_ok = _triton_ops()
            probe = torch.empty(1, 1, c.heads, c.head_dim, dtype=self.dtype, device=self.device)
            if attn_ok(probe):
                self._attend = attn
            if sample_ok(self._logits[:1]):
                self._fused_sample = sample_fused
        self._views: dict[int, list] = {}
        self._step_views: list = []
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.n, self._has_cond, self._knobs, self._generator = 0, False, (1.0, 0, 0.0), None

    # --- set-up ---------------------------------------------------------------------------
    def _cache_views(self, n: int) -> list:
        """Per layer (k, v, kv slots): the cache of ``n`` samples and its flat slot view ``[n, slots, 2, H, D]``."""
        if n not in self._views:
            cache = self.decoder.cache if n == self.decoder.batch else self.decoder.cache.narrow(n)
            self._views[n] = [(k, v, kv.view(n, -1, *kv.shape[-3:])) for k, v, kv in zip(cache.k, cache.v, cache.kv)]
        return self._views[n]

    def bind(self, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
             generator: torch.Generator | SampleGenerators | None = None) -> None:
        """Take over the decoder's current window (after ``begin``/``prime`` and, at position 0,
        one ``WindowDecoder.step``/``push``): copy its conditioning into the static buffer, its
        position into ``pos``, and fix the sampling knobs."""
        dec, c = self.decoder, self.config
        cond = dec.conditioning
        if cond is None:
            raise ValueError("no window: call the decoder's begin() first")
        if dec.seq_position == 0:
            raise ValueError("position 0 reads the start embedding: take the first step with WindowDecoder.step")
        if dec.seq_position >= c.seq_len:
            raise ValueError("the window is full")
        temperature, top_k, top_p = float(temperature), int(top_k), float(top_p)
        if not 0 <= temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        per_row = generator.generators if isinstance(generator, SampleGenerators) else [generator]
        for g in per_row:
            if g is not None and torch.device(g.device).type != self.device.type:
                raise ValueError(f"the generator is on {g.device}, the decoder on {self.device}")
        n = dec.n
        xc = cond.x_cond
        if xc is not None:
            if tuple(xc.shape) != (n, c.seq_len, self.tm.width):
                raise ValueError(f"x_cond has shape {tuple(xc.shape)}, expected {(n, c.seq_len, self.tm.width)}")
            if self._x_cond is None:
                self._x_cond = torch.zeros(dec.batch, c.seq_len, self.tm.width, dtype=self.dtype, device=self.device)
            self._x_cond[:n].copy_(xc)
        self.n, self._has_cond = n, xc is not None
        self._knobs, self._generator = (temperature, top_k, top_p), generator
        self.pos.fill_(dec.seq_position)

    @property
    def logits(self) -> torch.Tensor:
        """(n, bins) pre-temperature logits of the last step (a view of the static buffer)."""
        return self._logits[: self.n]

    @property
    def ids(self) -> torch.Tensor:
        """(n,) ids chosen by the last step (a view of the static buffer)."""
        return self._ids[: self.n]

    # --- the step -------------------------------------------------------------------------
    def _attend_layer(self, L: BlockWeights, h: torch.Tensor) -> torch.Tensor:
        """Attention of one query per sample at the device position (``block_forward``'s attention):
        its key/value into the layer's slot (``kv_cache.slot_index`` on the device), then
        ``decode_attention_masked`` (or the Triton kernel) over the whole static cache."""
        n, pos = h.shape[0], self.pos
        kc, vc, kvf = self._step_views[L.index]
        q = torch.addmm(L.b_q, h, L.w_q).view(n, 1, L.heads, L.head_dim)
        if L.pattern != "cross":
            kv = torch.addmm(L.b_kv, h, L.w_kv).view(n, 1, 2, L.heads, L.head_dim)
            c = self.config
            if L.pattern == "prime":   # only positions below prime_len are kept: else rewrite the old value
                idx = torch.clamp(pos, max=c.prime_len - 1).reshape(1)
                kv = torch.where(pos < c.prime_len, kv, kvf.index_select(1, idx))
            else:
                idx = slot_index(L.pattern, pos, c.block_len, c.seq_len // c.block_len).reshape(1)
            kvf.index_copy_(1, idx, kv)
        a = self._attend(q, kc, vc, L.pattern, pos, L.block_len, L.prime_len)
        return a.reshape(n, L.n_state)

    def _sample(self, logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """(n, bins) logits and Exp(1) noise -> (n,) ids, as ``sampling.sample_logits`` draws."""
        t, k, p = self._knobs
        if self._fused_sample is not None and t != 0:
            return self._fused_sample(logits, t, k, p, noise=noise)
        return sample_logits_reference(logits, t, k, p, noise=noise)

    def _draw_noise(self) -> None:
        fill_rows(self._noise[: self.n], self._generator, exponential_noise_)   # per sample, if given

    @torch.no_grad()
    def _body(self) -> None:
        """Everything of a step but the noise draw: the function a CUDA graph records."""
        tm, pos, n = self.tm, self.pos, self.n
        p1 = pos.reshape(1)
        tokens = self.decoder.token_buffer                                # (n, seq_len)
        x = tm.x_emb(tokens.index_select(1, p1 - 1).view(n))               # (n, W)
        x = x + tm.pos_emb.pos_emb.index_select(0, p1)
        xc = None
        if self._has_cond:
            xc = self._x_cond[:n].index_select(1, p1).view(n, -1)           # (n, W)
            x = x + xc
        self._step_views = self._cache_views(n)
        for L in self._layers:
            x = block_forward(L, x, self._attend_layer)
        logits = tm.head(x, xc)                                           # (n, bins)
        ids = self._sample(logits, self._noise[:n])
        tokens.index_copy_(1, p1, ids.view(n, 1))
        self._logits[:n].copy_(logits)
        self._ids[:n].copy_(ids)
        pos.add_(1)

    @torch.no_grad()
    def step_and_sample(self) -> None:
        """One eager step: draw the noise, score position ``pos``, sample, write the ids, ``pos += 1``.
        No host sync; the decoder's host position is updated by ``run`` or ``decoder.advance``."""
        if self.n == 0:
            raise ValueError("bind() a window first")
        self._draw_noise()
        self._body()

    # --- CUDA graphs ----------------------------------------------------------------------
    def _key(self) -> tuple:
        return (self.n, self._has_cond, *self._knobs)

    @torch.no_grad()
    def capture(self) -> None:
        """Record the step body for the bound batch and knobs (once; later calls reuse it).

        Warm-up runs on a side stream at the current position, which is restored afterwards: it
        writes only that position's cache slots and token, which the first real step rewrites."""
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device; the decoder is on {self.device} "
                               "(use step_and_sample)")
        if self.n == 0:
            raise ValueError("bind() a window first")
        key = self._key()
        if key in self._graphs:
            return
        start = self.pos.clone()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.pos.copy_(start)
                self._body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.pos.copy_(start)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._body()
        self._graphs[key] = graph

    def replay(self) -> None:
        """One step from the captured graph (``capture`` first): noise draw, then the replay."""
        graph = self._graphs.get(self._key())
        if graph is None:
            raise RuntimeError("no graph for this batch and these knobs: call capture() first")
        self._draw_noise()
        graph.replay()

    def step(self) -> None:
        """One step: a graph replay when graphs are on (capturing on first use), else eager."""
        if self.use_graphs:
            self.capture()
            self.replay()
        else:
            self.step_and_sample()

    def run(self, count: int, on_step: Callable[[int], None] | None = None) -> None:
        """``count`` steps, then the decoder's host position catches up. ``on_step(i)`` after
        step ``i`` (0-based) is host-side only."""
        dec = self.decoder
        if count < 0 or dec.seq_position + count > self.config.seq_len:
            raise ValueError(f"{count} steps do not fit: the window has {self.config.seq_len - dec.seq_position} "
                             "positions left")
        for i in range(count):
            self.step()
            if on_step is not None:
                on_step(i)
        dec.advance(count)


# sample_window's own defaults of the knobs a caller may leave out (written once, there)
_WINDOW_DEFAULTS = {k: v.default for k, v in inspect.signature(sample_window).parameters.items()
                    if v.kind is v.KEYWORD_ONLY and k != "run_steps"}


class GraphWindowSampler:
    """The ``"ar-graph"`` window sampler: ``ARWindowSampler``'s tokens through the fast step.

    Priming and position 0 go through the ``WindowDecoder``; every other token is one
    ``StaticStepDecoder.step`` (a CUDA graph replay on CUDA, eager elsewhere). The decoder is
    allocated for the largest batch seen so far (``batch`` if given)."""

    per_sample_generators = True   # takes SampleGenerators: one generator per row

    def __init__(self, prior: Prior, batch: int | None = None, device=None, *, backend: str | None = None,
                 cuda_graphs: bool | None = None):
        self.prior = prior
        self.device = torch.device(device) if device is not None else prior.device
        resolve_backend(self.device, backend)                 # bad flags fail here, not mid-run
        cuda_graphs_enabled(self.device, cuda_graphs)
        self._batch, self._backend, self._cuda_graphs = batch or 0, backend, cuda_graphs
        self.decoder: WindowDecoder | None = None
        self.fast: StaticStepDecoder | None = None

    def _ensure(self, n: int) -> None:
        if self.decoder is None or self.decoder.batch < n:
            self.decoder = WindowDecoder(self.prior, max(n, self._batch), device=self.device)
            self.fast = StaticStepDecoder(self.decoder, backend=self._backend, cuda_graphs=self._cuda_graphs)

    def __call__(self, known, n_new: int, upper=None, labels=None, **knobs) -> torch.Tensor:
        """Prime ``known`` (N, K) codes, sample ``n_new`` more -> (N, K + n_new) codes
        (``sampling.sample_window``'s arguments; ``generator`` may be one per sample)."""
        knobs = {**_WINDOW_DEFAULTS, **knobs}
        known = check_window_call(known, n_new, knobs["temperature"], knobs["top_k"], knobs["top_p"],
                                  self.prior.config, self.device)          # once, before choosing the decoder
        self._ensure(known.shape[0])
        return decode_window(self.decoder, known, n_new, upper, labels, run_steps=self._run_steps, **knobs)

    def _run_steps(self, count: int, knobs: dict, on_step: Callable[[int], None]) -> None:
        self.fast.bind(**knobs)
        self.fast.run(count, on_step=on_step)
