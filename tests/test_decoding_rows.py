"""Per-row positions in cached decoding: ``WindowDecoder.score_rows`` scores each row of a batch
from its own position (``KVCache.write_rows``, ``CachedForward.rows``,
``kernels.decode_attention.reference.cached_attention_rows``)."""
import numpy as np
import pytest
import torch

from fastjukebox import Prior, PriorConfig, load_prior
from fastjukebox.decoding import WindowDecoder
from fastjukebox.kv_cache import KVCache
from kernels.decode_attention.reference import cached_attention, cached_attention_rows, row_keys

from conftest import DATA

TOL = 1e-10


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _random_prior(attn_order, depth, n_ctx=40, blocks=5, level=0, seed=0):
    """A float64 prior with sharp random weights: an upsampler (per-row ``x_cond``) at level 0,
    an unlabelled top-level prior at level 2."""
    torch.manual_seed(seed)
    kw = dict(cond_width=8, cond_depth=1, cond_dilation_cycle=None) if level < 2 else {}
    cfg = PriorConfig(level=level, n_ctx=n_ctx, width=24, depth=depth, heads=2, attn_order=attn_order,
                      blocks=blocks, l_bins=16, labels=False, **kw)
    prior = Prior(cfg).double().eval()
    for p in prior.parameters():
        p.normal_(0, 0.3)
    return prior


def _case(name, batch=4, seed=1):
    """(prior, tokens (batch, n_ctx), upper, labels): every row its own tokens and conditioning."""
    g = torch.Generator().manual_seed(seed)
    if name.startswith("tiny_"):
        prior = load_prior(DATA / f"{name}.pth.tar", dtype=torch.float64)
        io = np.load(DATA / f"{name}_io.npz")
        reps = (batch + 1) // 2
        y = torch.from_numpy(io["y"]).repeat(reps, 1)[:batch]
        upper = torch.from_numpy(io["z_cond"]).repeat(reps, 1)[:batch] if "z_cond" in io else None
        c = prior.config
        return prior, torch.randint(0, c.l_bins, (batch, c.n_ctx), generator=g), upper, y
    prior = {"order2": lambda: _random_prior(2, 3),                     # block, transpose, prev_block
             "order2_c7": lambda: _random_prior(2, 3, n_ctx=56, blocks=8),   # block length 7
             "dense": lambda: _random_prior(0, 2, level=2),
             "order9": lambda: _random_prior(9, 4, n_ctx=42, blocks=6, level=2)}[name]()   # and dense, C 7
    c = prior.config
    upper = None
    if c.level < 2:
        upper = torch.randint(0, c.l_bins, (batch, c.n_ctx // c.cond_downsample), generator=g)
    return prior, torch.randint(0, c.l_bins, (batch, c.n_ctx), generator=g), upper, None


def _decoder(prior, tokens, upper, labels):
    dec = WindowDecoder(prior, tokens.shape[0])
    dec.begin(upper, labels)
    dec.token_buffer.copy_(tokens)
    return dec


def _walk(dec, targets, count=3):
    """Move every row to its target position with ``score_rows`` calls of ``count``, rows at their
    own pace (a row at its target re-runs from there). Returns the last call's starts."""
    starts = torch.zeros_like(targets)
    while bool((starts < targets).any()):
        _, valid = dec.score_rows(count, starts)
        starts = torch.minimum(starts + valid, targets)
    return starts


CASES = ["order2", "order2_c7", "dense", "order9", "tiny_upsampler_level_0", "tiny_prior_5b_lyrics"]


@pytest.mark.parametrize("name", CASES)
def test_rows_from_different_positions_equal_teacher_forcing(name):
    """Rows at 0, across a block boundary, mid-window and near the window's end: the valid logits
    equal the teacher-forced forward and the shared-position ``score`` of each row alone."""
    prior, z, upper, y = _case(name)
    c, C = prior.config, prior.config.block_len
    teacher = prior.logits(z, upper, y)
    starts = torch.tensor([0, C - 2, 2 * C + 1, c.n_ctx - 2])
    count = 5
    dec = _decoder(prior, z, upper, y)
    _walk(dec, starts)
    logits, valid = dec.score_rows(count, starts)
    assert logits.shape == (4, count, c.l_bins) and valid.dtype == torch.long
    assert valid.tolist() == [min(count, C - s % C, c.n_ctx - s) for s in starts.tolist()]
    assert valid.tolist()[1] == 2 and valid.tolist()[3] == 2        # cut at the block and at the window
    for n, (s, v) in enumerate(zip(starts.tolist(), valid.tolist())):
        assert _rel(logits[n, :v], teacher[n, s:s + v]) < TOL, n
        one = WindowDecoder(prior, 1)
        one.begin(None if upper is None else upper[n:n + 1], None if y is None else y[n:n + 1])
        one.prime(z[n:n + 1, :s])
        one.token_buffer[:, s:s + v] = z[n:n + 1, s:s + v]
        assert _rel(logits[n, :v], one.score(v)[0]) < TOL, n
        other = s + 1 if s + 1 < c.n_ctx else s - 1     # a wrong position: the comparison can fail
        assert (logits[n, 0] - teacher[n, other]).abs().max() > 1e-3, n


def _row_cache(cache: KVCache, n: int) -> list[torch.Tensor]:
    return [kv[n] for kv in cache.kv]


@pytest.mark.parametrize("name", ["order2", "order9"])
def test_padding_never_changes_the_cache(name, monkeypatch):
    """After a call with padded rows, each row's cache equals a decoder that ran only the valid
    positions, and the next calls from the valid ends give the teacher's logits; a write of the
    padding (the mutant) is caught by the same comparison."""
    prior, z, upper, y = _case(name)
    c, C = prior.config, prior.config.block_len
    teacher = prior.logits(z, upper, y)
    starts = torch.tensor([C - 2, 2 * C - 1, 3, c.n_ctx - 3])
    dec = _decoder(prior, z, upper, y)
    _walk(dec, starts)
    _, valid = dec.score_rows(C + 2, starts)              # longer than a block: every row padded
    assert (valid < C + 2).all()

    def alone(n):
        one = WindowDecoder(prior, 1)
        one.begin(None if upper is None else upper[n:n + 1], None if y is None else y[n:n + 1])
        one.prime(z[n:n + 1, :int(starts[n] + valid[n])])
        return _row_cache(one.cache, 0)

    for n in range(4):
        for layer, (got, want) in enumerate(zip(_row_cache(dec.cache, n), alone(n))):
            assert torch.allclose(got, want, rtol=0, atol=TOL), (n, layer)
    ends = starts + valid
    nxt = torch.minimum(ends, torch.tensor(c.n_ctx - 1))
    logits, v2 = dec.score_rows(3, nxt)
    for n, (s, v) in enumerate(zip(nxt.tolist(), v2.tolist())):
        assert _rel(logits[n, :v], teacher[n, s:s + v]) < TOL, n

    # the mutant that writes padding positions too is caught
    row_slots = KVCache.row_slots

    def padded(self, layer, st, va, T):
        return row_slots(self, layer, st, torch.clamp(c.seq_len - st, max=T), T)
    monkeypatch.setattr(KVCache, "row_slots", padded)
    bad = _decoder(prior, z, upper, y)
    _walk(bad, starts)
    bad.score_rows(C + 2, starts)
    monkeypatch.setattr(KVCache, "row_slots", row_slots)
    diff = max(float((g - w).abs().max()) for n in range(4) for g, w in zip(_row_cache(bad.cache, n), alone(n)))
    assert diff > 1e-3


@pytest.mark.parametrize("name", ["order2", "order9", "tiny_upsampler_level_0"])
def test_rows_rewind_by_moving_their_starts_back(name):
    """Speculative-style calls: each row keeps a prefix of its chunk, overwrites the next id (a
    correction) and the rest (new drafts), and starts after the kept prefix. The logits of kept
    positions, and those of a final full pass, equal a fresh decoder fed the final tokens."""
    prior, z, upper, y = _case(name)
    c = prior.config
    g = torch.Generator().manual_seed(4)
    dec = _decoder(prior, z, upper, y)
    buf = dec.token_buffer
    starts = torch.zeros(4, dtype=torch.long)
    kept_logits, stale = [], 0
    while bool((starts < c.n_ctx - 1).any()):
        logits, valid = dec.score_rows(4, starts)
        for n in range(4):
            s, v = int(starts[n]), int(valid[n])
            keep = int(torch.randint(0, v, (1,), generator=g))           # positions s .. s + keep stay
            kept_logits.append((n, s, logits[n, :keep + 1].clone()))
            if s + keep + 1 < c.n_ctx:
                old = buf[n, s + keep].clone()
                buf[n, s + keep] = (old + 1 + int(torch.randint(0, c.l_bins - 1, (1,), generator=g))) % c.l_bins
                buf[n, s + keep + 1:] = torch.randint(0, c.l_bins, (c.n_ctx - s - keep - 1,), generator=g)
                if keep + 1 < v:             # the next position's input changed: its old logits are stale
                    kept_logits.append((n, -(s + keep + 1), logits[n, keep + 1:keep + 2].clone()))
            starts[n] = min(s + keep + 1, c.n_ctx - 1)
    final = buf.clone()
    fresh = _decoder(prior, final, upper, y)
    stepped = []
    for t in range(c.n_ctx):
        stepped.append(fresh.step())
        fresh.push(final[:, t])
    stepped = torch.stack(stepped, 1)
    assert _rel(stepped, prior.logits(final, upper, y)) < TOL
    for n, s, lg in kept_logits:
        if s >= 0:
            assert _rel(lg, stepped[n, s:s + lg.shape[0]]) < TOL, (n, s)
        else:                                # the comparison tells the stale logits apart
            stale += 1
            assert (lg - stepped[n, -s:-s + 1]).abs().max() > 1e-3, (n, s)
    assert stale > 5


def test_resume_hands_rows_back_to_the_shared_position():
    prior, z, upper, y = _case("order2")
    teacher = prior.logits(z, upper, y)
    dec = _decoder(prior, z, upper, y)
    _walk(dec, torch.tensor([6, 6, 6, 6]))
    with pytest.raises(ValueError, match="resume"):
        dec.step()
    with pytest.raises(ValueError, match="resume"):
        dec.score(2)
    dec.resume(6)
    assert dec.position == 6 and torch.equal(dec.codes(), z[:, :6])
    assert _rel(dec.score(2), teacher[:, 6:8]) < TOL
    logits, valid = dec.score_rows(3, torch.tensor([6, 7, 8, 8]))   # from inside the ``score`` chunk
    for n, (s, v) in enumerate(zip([6, 7, 8, 8], valid.tolist())):
        assert _rel(logits[n, :v], teacher[n, s:s + v]) < TOL


# --- per-row cache writes -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny_prior_1b_lyrics", "order9"])   # prime layers; dense layers
def test_write_rows_stores_exactly_the_valid_positions(name):
    """Against ``KVCache.write`` of each row's valid positions alone, on a cache of random contents:
    padding positions (past the block, the window or ``prime_len``) leave every slot as it was."""
    config = (load_prior(DATA / f"{name}.pth.tar").config if name.startswith("tiny_")
              else _random_prior(9, 4, n_ctx=42, blocks=6, level=2).config)
    C, L, H, D = config.block_len, config.seq_len, config.heads, config.head_dim
    g = torch.Generator().manual_seed(2)
    P = config.prime_len or 5
    starts = torch.tensor([0, C - 2, P, P - 2, L - 3, 2 * C + 1])     # P - 2: a chunk across prime_len
    N, T = len(starts), C + 3
    valid = torch.minimum(torch.minimum(C - starts % C, L - starts), torch.tensor(T))
    cache = KVCache(config, N, torch.float64, "cpu")
    for kv in cache.kv:
        kv.copy_(torch.randn(kv.shape, generator=g, dtype=torch.float64))
    alone = []
    for n in range(N):
        one = KVCache(config, 1, torch.float64, "cpu")
        for a, b in zip(one.kv, cache.kv):
            a.copy_(b[n:n + 1])
        alone.append(one)
    for layer, pattern in enumerate(cache.patterns):
        if pattern == "cross":
            continue
        kv = torch.randn(N, T, 2, H, D, generator=g, dtype=torch.float64)
        before = cache.kv[layer].clone()
        cache.write_rows(layer, kv, starts, valid)
        for n in range(N):
            v, s = int(valid[n]), int(starts[n])
            alone[n].write(layer, kv[n:n + 1, :v, 0], kv[n:n + 1, :v, 1], s)
            assert torch.equal(cache.kv[layer][n], alone[n].kv[layer][0]), (pattern, n)
        assert not torch.equal(cache.kv[layer], before), pattern    # something was written
    lyric = KVCache(load_prior(DATA / "tiny_prior_5b_lyrics.pth.tar").config, 1, torch.float64, "cpu")
    with pytest.raises(ValueError, match="cross-attention layers"):
        lyric.write_rows(lyric.patterns.index("cross"), torch.zeros(1, 1, 64), starts[:1], valid[:1])


# --- the per-row attention reference ------------------------------------------------------

def _caches(pattern, N, H, D, C, nb, P, S, g):
    shape = {"block": (C,), "prev_block": (2, C), "transpose": (C, nb), "dense": (C * nb,), "prime": (P,),
             "cross": (S,)}[pattern]
    return (torch.randn(N, *shape, H, D, generator=g, dtype=torch.float64) for _ in range(2))


@pytest.mark.parametrize("D", [150, 256, 480])
@pytest.mark.parametrize("pattern", ["block", "prev_block", "transpose", "dense", "prime", "cross"])
def test_rows_attention_equals_the_single_position_reference(pattern, D):
    g = torch.Generator().manual_seed(D)
    N, H, C, nb, P, S = 3, 2, 7, 4, 11, 5
    L = C * nb
    k, v = _caches(pattern, N, H, D, C, nb, P, S, g)
    for T, starts in ((1, [0, C - 1, L - 1]), (1, [C, 2 * C + 3, 9]), (3, [0, C + 2, L - 3]), (3, [4, 2 * C, 10])):
        starts = torch.tensor(starts)
        q = torch.randn(N, T, H, D, generator=g, dtype=torch.float64)
        got = cached_attention_rows(q, k, v, pattern, starts, C, P)
        assert got.shape == q.shape and not got.isnan().any()
        shared = cached_attention_rows(q, k, v, pattern, starts, C, P, keys=row_keys(pattern, starts, T, C, k))
        assert torch.equal(shared, got)
        for n in range(N):
            for t in range(T):
                p = int(starts[n]) + t
                ref = cached_attention(q[n:n + 1, t:t + 1], k[n:n + 1], v[n:n + 1], pattern, p, C, P)
                if ref is None:                         # previous block of block 0: exactly zero
                    assert torch.equal(got[n, t], torch.zeros_like(got[n, t])), (n, p)
                else:
                    assert _rel(got[n:n + 1, t:t + 1], ref) < 1e-12, (n, p)
        if pattern != "cross":                          # other positions read other keys
            moved = cached_attention_rows(q, k, v, pattern, starts + C + 1, C, P)
            assert (moved - got).abs().max() > 1e-6


def test_rows_attention_has_no_nan_for_padding_past_the_window():
    g = torch.Generator().manual_seed(0)
    for pattern in ("block", "prev_block", "transpose", "dense", "prime"):
        k, v = _caches(pattern, 2, 1, 6, 5, 3, 4, 0, g)
        q = torch.randn(2, 6, 1, 6, generator=g, dtype=torch.float64)
        out = cached_attention_rows(q, k, v, pattern, torch.tensor([0, 13]), 5, 4)
        assert not out.isnan().any(), pattern


# --- bad input ------------------------------------------------------------------------------

def test_bad_input_is_named():
    prior, z, upper, y = _case("order2")
    c = prior.config
    dec = WindowDecoder(prior, 4)
    with pytest.raises(ValueError, match="before begin"):
        dec.score_rows(2, torch.zeros(4, dtype=torch.long))
    dec.begin(upper, y)
    dec.token_buffer.copy_(z)
    with pytest.raises(ValueError, match="count must be an integer >= 1, got 0"):
        dec.score_rows(0, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="count must be an integer"):
        dec.score_rows(2.0, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"starts must be a long tensor of shape \(4,\)"):
        dec.score_rows(2, torch.zeros(4))
    with pytest.raises(ValueError, match=r"starts must be a long tensor of shape \(4,\)"):
        dec.score_rows(2, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"starts must be a long tensor of shape \(4,\)"):
        dec.score_rows(2, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"starts must be a long tensor"):
        dec.score_rows(2, [0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"starts must lie in \[0, 40\), row 2 starts at -1"):
        dec.score_rows(2, torch.tensor([0, 0, -1, 0]))
    with pytest.raises(ValueError, match=r"starts must lie in \[0, 40\), row 0 starts at 40"):
        dec.score_rows(2, torch.tensor([40, 0, 0, 0]))
    with pytest.raises(ValueError, match="row 1 cannot start at 3: its cached keys allow starts 0..0"):
        dec.score_rows(2, torch.tensor([0, 3, 0, 0]))
    _, valid = dec.score_rows(3, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="row 3 cannot start at 4: its cached keys allow starts 0..3"):
        dec.score_rows(2, torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"position must be an integer in \[0, 40\]"):
        dec.resume(41)
    with pytest.raises(ValueError, match="starts must be an integer tensor of shape"):
        cached_attention_rows(torch.zeros(2, 1, 1, 4), torch.zeros(2, 5, 1, 4), torch.zeros(2, 5, 1, 4), "block",
                              torch.zeros(3, dtype=torch.long), 5)
    merged = load_prior(DATA / "tiny_prior_1b_lyrics.pth.tar", dtype=torch.float64)
    io = np.load(DATA / "tiny_prior_1b_lyrics_io.npz")
    mdec = WindowDecoder(merged, 2)
    mdec.begin(None, torch.from_numpy(io["y"]))
    with pytest.raises(ValueError, match="merged-lyric"):
        mdec.score_rows(2, torch.zeros(2, dtype=torch.long))
