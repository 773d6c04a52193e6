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

Speculative samplers whose rows advance at their own pace score each row from its own position::

    logits, valid = dec.score_rows(T, starts)   # (N, T, bins) for positions starts[n] .. + T - 1
    ...                                         # row n's next start: anywhere in its last chunk

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

_RESUME = "rows moved apart in score_rows: resume(position) sets the shared position first"


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
        self._rows = None      # (starts, ends) of the last ``score_rows`` chunks, per row
        self._hidden = (0, None)  # first sequence position and final activations (N, T, W) of the last forward

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
        self._rows = None

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
        self._scored, self._rows, self._hidden = (0, 0), None, (0, None)
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
        self._rows = None
        while self._pos < end:
            p = self._pos
            T = min(end - p, chunk_size, C - p % C)
            self._hidden = (p, self._forward(tm.inputs_at(tokens, p, T, cond.start, cond.x_cond), p, self._view))
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
        if p >= self.config.seq_len or self._rows is not None:
            raise ValueError("the window is full" if self._rows is None else _RESUME)
        xc = None if cond.x_cond is None else cond.x_cond[:, p]
        h = self._forward(tm.input_one(self._window_tokens, p, cond.start, xc), p, self._view)
        self._pos, self._rows, self._hidden = p + 1, None, (p, h[:, None])
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
        if self._rows is not None:
            raise ValueError(_RESUME)
        if p + count > self.config.seq_len or p // C != (p + count - 1) // C:
            raise ValueError(f"cannot score {count} positions from {p}: a chunk stays inside one block of {C} "
                             f"and the window of {self.config.seq_len}")
        x_cond = None if cond.x_cond is None else cond.x_cond[:, p:p + count]
        h = self._forward(tm.inputs_at(self._window_tokens, p, count, cond.start, cond.x_cond), p, self._view)
        self._scored, self._pos, self._rows = (p, p + count), p + count, None
        self._hidden = (p, h)
        return tm.head(h, x_cond)

    @torch.no_grad()
    def score_rows(self, count: int, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score every row from its own music position in one batched cached forward.

        ``starts: (N,)`` long, row ``n``'s first position. Returns ``(logits, valid)``:
        pre-temperature logits ``(N, count, bins)`` of positions ``starts[n] + t`` and ``valid: (N,)``
        long, ``min(count, C - starts % C, seq_len - starts)``: row ``n``'s positions
        ``t < valid[n]`` stay inside its block and the window; the rest are padding, their logits
        meaningless and their keys never cached. As for ``score``, the input of position ``p`` is the
        id at ``p - 1`` in ``token_buffer`` (position 0: the start embedding), plus its position's
        embedding and the conditioning of its row at ``p``.

        Contract (no separate rewind): a call needs the keys of every position before each row's
        start, so row ``n`` may start anywhere from the start to the valid end of its last
        ``score_rows`` chunk, or, when the last call moved the shared position (``prime``,
        ``step``, ``score``, ``advance``, ``resume``), at that position (or inside the last
        ``score`` chunk). Slots of positions from a row's start on are overwritten; a row that is
        done may re-run its last position, ``n_ctx - 1`` (its keys come out the same). Starting
        elsewhere, or outside ``[0, n_ctx)``, is a ValueError (one host sync per call). The shared
        ``position`` does not move: ``resume`` sets it before ``step``/``score``/``codes``.
        Merged-lyric priors are not supported here."""
        c, C, cond, tm = self.config, self.config.block_len, self._cond, self.prior.prior
        if self.offset:
            raise ValueError("score_rows does not support merged-lyric (1b-style) priors")
        if cond is None:
            raise ValueError("score_rows before begin: no window")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an integer >= 1, got {count!r}")
        if not isinstance(starts, torch.Tensor) or starts.dtype != torch.long or tuple(starts.shape) != (self.n,):
            got = (f"{tuple(starts.shape)} {starts.dtype}" if isinstance(starts, torch.Tensor)
                   else type(starts).__name__)
            raise ValueError(f"starts must be a long tensor of shape ({self.n},), got {got}")
        starts = starts.to(self.device)
        if self._rows is not None:
            lo, hi = self._rows
        else:
            shared = self._scored[0] if self._scored[1] == self._pos else self._pos
            lo, hi = torch.full_like(starts, shared), torch.full_like(starts, self._pos)
        outside = (starts < 0) | (starts >= c.seq_len)
        bad = outside | (starts < lo) | (starts > hi)
        if bool(bad.any()):                       # the one host sync of a call
            n = int(bad.nonzero()[0])
            if bool(outside[n]):
                raise ValueError(f"starts must lie in [0, {c.n_ctx}), row {n} starts at {int(starts[n])}")
            raise ValueError(f"row {n} cannot start at {int(starts[n])}: its cached keys allow starts "
                             f"{int(lo[n])}..{min(int(hi[n]), c.seq_len - 1)}")
        valid = torch.minimum(torch.minimum(C - starts % C, c.seq_len - starts), torch.full_like(starts, count))
        positions = (starts[:, None] + torch.arange(count, device=self.device)).clamp(max=c.seq_len - 1)
        x_cond = None
        if cond.x_cond is not None:
            x_cond = cond.x_cond.gather(1, positions[..., None].expand(-1, -1, cond.x_cond.shape[2]))
        x = tm.inputs_rows(self._window_tokens, positions, cond.start, x_cond)
        h = self._forward.rows(x, starts, valid, self._view)
        self._rows, self._scored, self._hidden = (starts, starts + valid), (0, 0), (starts, h)
        return tm.head(h, x_cond), valid

    def resume(self, position: int) -> None:
        """Set the shared position to music position ``position`` after ``score_rows``: every
        row's keys before it must be cached; ``step``, ``score``, ``push`` and ``codes`` go on from
        there."""
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= self.config.n_ctx:
            raise ValueError(f"position must be an integer in [0, {self.config.n_ctx}], got {position!r}")
        self._pos, self._scored, self._rows = position + self.offset, (0, 0), None

    def hidden(self, position: int) -> torch.Tensor:
        """Final activations (N, W) of music position ``position`` (the prior's feature that gives
        its distribution, before the output head), which the last forward (a ``prime`` chunk, a
        ``step`` or a ``score``) must have run; a drafter reads them (``distill.drafter``)."""
        lo, h = self._hidden
        if isinstance(lo, torch.Tensor):
            raise ValueError("the last forward was score_rows: read its features with hidden_rows")
        t = position + self.offset - lo
        if h is None or not 0 <= t < h.shape[1]:
            ran = "nothing" if h is None else f"music positions {lo - self.offset}..{lo - self.offset + h.shape[1] - 1}"
            raise ValueError(f"the last forward ran {ran}, not position {position}")
        return h[:, t]

    def hidden_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Final activations (N, W) of row ``n`` at music position ``positions[n]``, which the last
        ``score_rows`` must have run for that row (from its start, inside its chunk)."""
        starts, h = self._hidden
        if not isinstance(starts, torch.Tensor):
            raise ValueError("the last forward was not score_rows: read its features with hidden")
        t = positions - starts
        if bool(((t < 0) | (t >= h.shape[1])).any()):
            raise ValueError(f"positions outside the chunks score_rows just ran (rows start at {starts.tolist()})")
        return h[torch.arange(h.shape[0], device=h.device), t]

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
        self._pos, self._rows = target, None

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
