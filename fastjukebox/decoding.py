"""The step interface between samplers and a prior: one window, decoded with a static cache.

A ``WindowDecoder`` owns the prior's key/value cache and the window's token buffer, allocated
once for a batch size and reused for every window::

    dec = WindowDecoder(prior, batch=4)
    dec.begin(upper, labels)           # conditioning of this window
    dec.prime(known_codes, chunk_size) # known tokens fill the cache, no logits
    for _ in range(n_new):
        logits = dec.step()            # (N, bins) for the next position
        dec.push(ids)                  # the chosen ids become the next input
    codes = dec.codes()                # (N, position) music codes

Speculative samplers score several proposed positions in one cached forward and keep a prefix::

    dec.token_buffer[:, p:p + T - 1] = proposals  # inputs after the last pushed token
    logits = dec.score(T)              # (N, T, bins) for positions p .. p + T - 1
    dec.rewind(p + kept)               # a static cache forgets by moving the position back

Positions are counted in music tokens. For merged-lyric (1b-style) priors the lyric prefix is
primed by ``begin``; ``step`` scores the merged vocabulary, ``push`` takes merged ids (as the
original feeds them back) and ``codes`` maps them to music codes, lyric ids becoming code 0.
"""
from __future__ import annotations

import torch

from .cached_forward import CachedForward
from .kv_cache import KVCache
from .prior import Prior
from .settings import DEFAULT_CHUNK_SIZE


class WindowDecoder:
    def __init__(self, prior: Prior, batch: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        w = prior.prior.x_emb.weight
        self.prior, self.config = prior, prior.config
        self.batch = batch
        self.dtype, self.device = dtype or w.dtype, device or w.device
        self._cache = KVCache(self.config, batch, self.dtype, self.device)
        self._forward = CachedForward(prior.prior)
        self._tokens = torch.zeros(batch, self.config.seq_len, dtype=torch.long, device=self.device)
        self._window_tokens = self._tokens[:0]    # the first n rows once a window begins
        self.n = 0
        self._pos = 0          # sequence positions whose keys are cached
        self._cond = None
        self._scored = (0, 0)  # sequence positions [from, to) of the last ``score`` chunk

    @property
    def offset(self) -> int:
        """Lyric positions in front of the music (merged-lyric priors)."""
        return self.config.n_lyric_prefix

    @property
    def position(self) -> int:
        """Music tokens known or sampled so far in this window."""
        return self._pos - self.offset

    @property
    def cache(self) -> KVCache:
        return self._cache

    @property
    def conditioning(self):
        """The current window's ``Conditioning`` (set by ``begin``)."""
        return self._cond

    @property
    def seq_position(self) -> int:
        """Sequence positions whose keys are cached: ``position`` plus the lyric prefix."""
        return self._pos

    @property
    def token_buffer(self) -> torch.Tensor:
        """The window's raw id buffer (N, seq_len), indexed by sequence position (a view)."""
        return self._window_tokens

    def advance(self, count: int) -> None:
        """Account for ``count`` steps taken outside this object (``fastjukebox.fast_decode``):
        their keys are in ``cache`` and their chosen ids in ``token_buffer``."""
        if count < 0 or self._pos + count > self.config.seq_len:
            raise ValueError(f"cannot advance {count} positions from {self.position} "
                             f"(window of {self.config.n_ctx})")
        self._pos += count

    @torch.no_grad()
    def begin(self, upper=None, labels=None, n: int | None = None) -> None:
        """Start a window: conditioning from ``upper`` codes / ``labels``, empty cache."""
        w = self.prior.prior.x_emb.weight
        if w.dtype != self.dtype:
            raise ValueError(f"the prior's weights are {w.dtype}, this decoder's cache {self.dtype}: build the "
                             f"WindowDecoder after converting the prior, in its dtype")
        if self._forward.stale():     # the prior was moved or converted in place since: re-read its weights
            self._forward = CachedForward(self.prior.prior)
        cond = self.prior.condition(upper, labels)
        first = next((t for t in (cond.start, cond.x_cond, cond.lyric_tokens) if t is not None), None)
        n = n if n is not None else (first.shape[0] if first is not None else self.batch)
        if n > self.batch:
            raise ValueError(f"window batch {n} exceeds the decoder's batch {self.batch}")
        self.n, self._pos, self._cond = n, 0, cond
        self._scored = (0, 0)
        self._window_tokens = self._tokens[:n]
        self._view = self._cache if n == self.batch else self._cache.narrow(n)
        if cond.encoder_kv is not None:
            self.prior.prior.set_cross_cache(self._view, cond.encoder_kv)
        if self.offset:
            self._window_tokens[:, : self.offset] = cond.lyric_tokens
            self._run(self.offset, chunk_size=self.offset)

    def _run(self, count: int, chunk_size: int) -> None:
        """Forward ``count`` positions from the current one, in chunks that never cross a block
        boundary (the static cache keeps one block for block layers)."""
        tm, C, cond = self.prior.prior, self.config.block_len, self._cond
        tokens = self._window_tokens
        end = self._pos + count
        while self._pos < end:
            p = self._pos
            T = min(end - p, chunk_size, C - p % C)
            self._forward(tm.inputs_at(tokens, p, T, cond.start, cond.x_cond), p, self._view)
            self._pos += T

    @torch.no_grad()
    def prime(self, codes: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        """Feed known music codes (N, K) at the current position (their keys fill the cache)."""
        c = self.config
        codes = torch.as_tensor(codes, device=self.device).long()
        K = codes.shape[1]
        if K == 0:
            return
        if codes.shape[0] != self.n:
            raise ValueError(f"codes have batch {codes.shape[0]}, the window {self.n}")
        if self._pos + K > c.seq_len:
            raise ValueError(f"{K} codes do not fit: window has {c.n_ctx - self.position} positions left")
        if codes.min() < 0 or codes.max() >= c.l_bins:
            raise ValueError(f"codes must be in [0, {c.l_bins})")
        shift = c.n_vocab if c.lyrics == "merged" else 0
        self._window_tokens[:, self._pos:self._pos + K] = codes + shift
        self._run(K, chunk_size)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Pre-temperature logits (N, bins) of the next position; its input (the previous token)
        enters the cache. Follow with ``push``."""
        p, cond, tm = self._pos, self._cond, self.prior.prior
        if p >= self.config.seq_len:
            raise ValueError("the window is full")
        xc = None if cond.x_cond is None else cond.x_cond[:, p]
        h = self._forward(tm.input_one(self._window_tokens, p, cond.start, xc), p, self._view)
        self._pos = p + 1
        return tm.head(h, xc)

    @torch.no_grad()
    def score(self, count: int) -> torch.Tensor:
        """Pre-temperature logits (N, count, bins) of the next ``count`` positions in one cached
        forward (``fastjukebox.cached_forward``: as many tensor operations as one step). The input of position ``t`` is the id at ``t - 1`` in
        ``token_buffer``: the last pushed token, then whatever the caller wrote after it (proposals).
        Their keys enter the cache; the chunk must stay inside one block. ``rewind`` keeps a prefix."""
        p, C, cond, tm = self._pos, self.config.block_len, self._cond, self.prior.prior
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an integer >= 1, got {count!r}")
        if p + count > self.config.seq_len or p // C != (p + count - 1) // C:
            raise ValueError(f"cannot score {count} positions from {p}: a chunk stays inside one block of {C} "
                             f"and the window of {self.config.seq_len}")
        x_cond = None if cond.x_cond is None else cond.x_cond[:, p:p + count]
        h = self._forward(tm.inputs_at(self._window_tokens, p, count, cond.start, cond.x_cond), p, self._view)
        self._scored, self._pos = (p, p + count), p + count
        return tm.head(h, x_cond)

    def rewind(self, position: int) -> None:
        """Keep the cached positions before music position ``position`` and forget the rest of the
        last ``score`` chunk (their slots are overwritten when those positions are run again).
        ``position`` must lie in ``(start of that chunk, position]``; follow with ``push`` of the id
        chosen for ``position - 1`` when it differs from the one scored."""
        target = position + self.offset
        lo, hi = self._scored
        if hi != self._pos or not lo < target <= hi:
            raise ValueError(f"can rewind only inside the chunk ``score`` just ran (music positions "
                             f"{lo - self.offset + 1}..{hi - self.offset} when nothing ran since), got {position}")
        self._pos = target

    def push(self, ids: torch.Tensor) -> None:
        """The ids (N,) chosen for the position ``step`` just scored."""
        if self._pos <= self.offset:
            raise ValueError("push before step")
        self._window_tokens[:, self._pos - 1].copy_(ids.view(-1))

    def tokens(self) -> torch.Tensor:
        """Raw ids of the window so far, (N, position) (merged ids for 1b-style priors)."""
        return self._window_tokens[:, self.offset:self._pos]

    def codes(self) -> torch.Tensor:
        """Music codes of the window so far, (N, position)."""
        raw = self.tokens()
        if self.config.lyrics == "merged":
            return (raw - self.config.n_vocab).clamp(min=0)
        return raw.clone()
