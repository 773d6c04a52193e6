"""The prefix-cached attention layout of the parallel students and the sampler's cached path."""
import pytest
import torch

from distill.prefix_layout import full_forward
from distill.sampler import ParallelWindowSampler
from distill.student import ParallelStudent, StudentSampling
from fastjukebox import PriorConfig


def _config(**kw) -> PriorConfig:
    """n_ctx 40 = 5 blocks of 8; block, transpose and previous-block layers."""
    base = dict(level=0, n_ctx=40, width=32, depth=3, heads=2, attn_order=2, blocks=5, l_bins=27,
                y_bins=(6, 9), max_bow_genre_size=2, cond_width=8, cond_depth=1, cond_dilation_cycle=None)
    return PriorConfig(**{**base, **kw})


def _student(seed=0, layout="tokens", **kw) -> ParallelStudent:
    torch.manual_seed(seed)
    s = ParallelStudent(_config(**kw), layout).double().eval()
    with torch.no_grad():               # untrained weights are near zero: give attention something to do
        for name, p in s.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return s


def _inputs(c, n, g):
    upper = torch.randint(0, c.l_bins, (n, c.n_ctx // c.cond_downsample), generator=g)
    genres = torch.randint(-1, c.y_bins[0], (n, c.max_bow_genre_size), generator=g)
    artist = torch.randint(0, c.y_bins[1], (n, 1), generator=g)
    labels = torch.cat([torch.tensor([[44100 * 9, 0, c.sample_length]]).expand(n, 3), artist, genres], 1)
    return upper, labels


@pytest.mark.parametrize("layout", ["tokens", "shifted"])
@pytest.mark.parametrize("merged_decoder", [False, True], ids=["tied", "untied"])
@pytest.mark.parametrize("P", [8, 16, 13, 1, 39])
def test_cached_pass_equals_the_full_pass_in_float64(merged_decoder, P, layout):
    g = torch.Generator().manual_seed(P)
    student = _student(merged_decoder=merged_decoder, layout=layout)
    c = student.config
    upper, labels = _inputs(c, 3, g)
    tokens = torch.randint(0, c.l_bins + 1, (3, c.n_ctx), generator=g)
    tokens[:, :P] = torch.randint(0, c.l_bins, (3, P), generator=g)
    with torch.no_grad():
        cond = student.condition(upper, labels)
        m = student.prior                                                        # float64 logits
        full = m(tokens, cond.start, cond.x_cond, prefix_len=P)                  # (3, n_ctx, V)
        cache = student.prefix_cache(tokens[:, :P], cond)
        positions = torch.stack([torch.randperm(c.n_ctx - P, generator=g)[:7] + P for _ in range(3)])
        cached = m(tokens, cond.start, cond.x_cond, cache=cache, positions=positions)
        cached_range = m(tokens, cond.start, cond.x_cond, P, c.n_ctx, cache=cache)
    assert full.dtype == cached.dtype == torch.float64
    assert full.std() > 0.1
    want = full.gather(1, positions[..., None].expand(-1, -1, c.l_bins))
    torch.testing.assert_close(cached.double(), want.double(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cached_range.double(), full[:, P:].double(), rtol=1e-12, atol=1e-12)


def _double_logits(student, tokens, cond, prefix_len):
    """The layout's logits without the fp32 cast of ``forward`` (float64 throughout)."""
    m = student.prior
    return m(tokens, cond.start, cond.x_cond, prefix_len=prefix_len)


def test_prefix_is_self_contained_and_the_rest_sees_everything():
    g = torch.Generator().manual_seed(0)
    student = _student()
    c = student.config
    P = 16
    upper, labels = _inputs(c, 2, g)
    a = torch.randint(0, c.l_bins, (2, c.n_ctx), generator=g)
    b = a.clone()
    b[:, P:] = torch.randint(0, c.l_bins, (2, c.n_ctx - P), generator=g)     # other unknown part
    d = a.clone()
    d[:, 3] = (a[:, 3] + 1) % c.l_bins                                       # another prefix code
    with torch.no_grad():
        cond = student.condition(upper, labels)
        la, lb, ld = (_double_logits(student, t, cond, P) for t in (a, b, d))
        bidirectional = _double_logits(student, a, cond, 0)
        plain = student.prior.transformer(student.prior.embed(a, cond.start, cond.x_cond), None, causal=False)
        plain_logits = student.prior.head(plain, cond.x_cond, torch.arange(c.n_ctx))
    assert la.dtype == torch.float64
    torch.testing.assert_close(la[:, :P], lb[:, :P], rtol=0, atol=1e-12)     # prefix ignores the rest
    assert (la[:, :P] - ld[:, :P]).abs().max() > 1e-3
    assert (la[:, P:] - ld[:, P:]).abs().amax(-1).min() > 1e-6             # every later position sees the prefix
    assert (la[:, P:] - lb[:, P:]).abs().max() > 1e-3
    torch.testing.assert_close(bidirectional, plain_logits, rtol=0, atol=0)  # P = 0: plain bidirectional
    assert (la[:, :P] - bidirectional[:, :P]).abs().max() > 1e-3             # the layout does change the prefix


def test_full_forward_refuses_cross_attention():
    from fastjukebox.transformer import Transformer
    t = Transformer(16, 8, 2, 4, 6, 2).eval()        # attn_order 6: its 4th layer is cross-attention
    with pytest.raises(ValueError, match="cross-attention"):
        full_forward(t, torch.zeros(1, 8, 16), 4)


@pytest.mark.parametrize("order", ["confidence", "spread", "random"])
@pytest.mark.parametrize("K,n_new,passes", [(20, 20, 4), (13, 27, 2), (16, 24, 1), (0, 40, 3), (8, 16, 5)])
@pytest.mark.parametrize("layout", ["tokens", "shifted"])
def test_a_pass_never_changes_known_or_final_tokens(K, n_new, passes, order, layout):
    """Recorded inputs of every pass: known codes never change, a code once unmasked keeps its
    value through every later pass and into the output; with the prefix cache and without (full
    bidirectional passes)."""
    g = torch.Generator().manual_seed(K + n_new)
    student = _student(layout=layout).float()
    c = student.config
    upper, labels = _inputs(c, 3, g)
    known = torch.randint(0, c.l_bins, (3, K), generator=g)
    outs = {}
    for cached in (True, False):
        seen = []
        hook = student.prior.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
        try:
            sampler = ParallelWindowSampler(student, passes=passes, prefix_cache=cached, confidence_noise=1.0,
                                            order=order)
            out = sampler(known, n_new, upper, labels, generator=torch.Generator().manual_seed(5))
        finally:
            hook.remove()
        assert len(seen) == passes
        for before, after in zip(seen, seen[1:] + [torch.cat([out, seen[-1][:, K + n_new:]], 1)]):
            assert torch.equal(before[:, :K], known)
            final = before != student.mask_id
            assert torch.equal(after[final], before[final])
            assert (after[:, K + n_new:] == student.mask_id).all()
        assert torch.equal(out[:, :K], known)
        outs[cached] = out
    # the two layouts give the unknown positions different inputs (a property of the layouts,
    # checked once: with this small student only a few draws differ, so other orders' noise may
    # happen to hide it)
    if K and order == "confidence":
        assert not torch.equal(outs[True], outs[False])


def test_sampler_takes_passes_and_layout_from_the_student_and_names_bad_arguments():
    student = _student().float()
    student.sampling = StudentSampling(passes=3, prefix_cache=True, confidence_noise=0.0)
    s = ParallelWindowSampler(student)
    assert s.passes == 3 and s.prefix_cache is True
    assert ParallelWindowSampler(student, passes=2, prefix_cache=False).prefix_cache is False
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="passes must be an integer >= 1"):
            ParallelWindowSampler(student, passes=bad)
    with pytest.raises(ValueError, match="passes must be an integer >= 1"):
        StudentSampling(passes=0)
    with pytest.raises(ValueError, match="prefix_cache must be true or false"):
        StudentSampling(prefix_cache="yes")
    with pytest.raises(ValueError, match="prefix_len must be an integer in"):
        student(torch.zeros(1, 40, dtype=torch.long), student.condition(*_inputs(student.config, 1,
                                                                                  torch.Generator())), prefix_len=40)


def test_a_student_for_another_level_is_named(tmp_path):
    import shutil
    import fastjukebox as fj
    from fastjukebox.checkpoint import CheckpointError
    from fastjukebox.samplers import SAMPLERS
    jb = fj.load("demo")
    with pytest.raises(ValueError, match="upsamples level 0, not level 1"):
        ParallelWindowSampler(jb.student(0), level=1)
    assert SAMPLERS["parallel"](jb, 1).student is jb.student(1)
    family = tmp_path / "family"
    from fastjukebox.bundle import ASSETS
    shutil.copytree(ASSETS / "demo", family)
    shutil.rmtree(family / "student_level_1")
    shutil.copytree(family / "student_level_0", family / "student_level_1")
    with pytest.raises(CheckpointError, match="student for level 0, not level 1"):
        fj.load(family)


def test_training_runs_prefix_rows_under_the_layout_and_the_others_without():
    from distill.train import DistillLoss
    g = torch.Generator().manual_seed(4)
    student = _student().double()       # float64: the two orders of arithmetic agree to rounding
    c = student.config
    upper, labels = _inputs(c, 4, g)
    inputs = torch.randint(0, c.l_bins + 1, (4, c.n_ctx), generator=g)
    prefix = torch.tensor([True, False, True, False])
    with torch.no_grad():
        got = DistillLoss(student, 0.0, 16)._logits(inputs, student.condition(upper, labels), prefix)
        for i in range(4):
            want = student(inputs[i:i + 1], student.condition(upper[i:i + 1], labels[i:i + 1]),
                           prefix_len=16 if prefix[i] else 0)
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-10, atol=1e-10)
        plain = DistillLoss(student, 0.0, 0)._logits(inputs, student.condition(upper, labels), prefix)
    assert (plain[0] - got[0]).abs().max() > 1e-3 and torch.allclose(plain[1], got[1], rtol=1e-10, atol=1e-10)


# --- the CPU's block-local attention and the last layer at the scored rows only ----------------

def _patterns_student(**kw) -> ParallelStudent:
    """n_ctx 48 = 6 blocks of 8; depth 6: every pattern twice, the last layer a transpose one."""
    return _student(**{"n_ctx": 48, "blocks": 6, "depth": 6, **kw})


@pytest.mark.parametrize("pattern", ["block", "prev_block", "transpose"])
@pytest.mark.parametrize("P", [8, 16, 24, 40])
def test_block_local_attention_equals_attend_in_float64(pattern, P):
    from distill import prefix_layout as pl
    from fastjukebox.block_forward import layer_table
    student = _patterns_student()
    L = next(L for L in layer_table(student.prior.transformer) if L.pattern == pattern)
    g = torch.Generator().manual_seed(P)
    N, T, H, D = 3, 48, L.heads, L.head_dim
    q, k, v = (torch.randn(N, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    # the prefix attending within itself, and the suffix against it
    torch.testing.assert_close(pl._block_local(L, q[:, :P], k[:, :P], v[:, :P]),
                               pl._attend(L, q[:, :P], k[:, :P], v[:, :P]), rtol=1e-12, atol=1e-12)
    got = pl._block_local(L, q[:, P:], k[:, P:], v[:, P:], k[:, :P], v[:, :P])
    torch.testing.assert_close(got, pl._attend(L, q[:, P:], k, v), rtol=1e-12, atol=1e-12)
    assert got.abs().max() > 0.1
    if pattern == "prev_block" and P == 8:          # the window's first block reads no key: exactly 0
        assert torch.equal(pl._block_local(L, q[:, :P], k[:, :P], v[:, :P]), torch.zeros_like(q[:, :P]))


def test_block_local_attention_declines_what_it_does_not_cover():
    from distill import prefix_layout as pl
    from fastjukebox.block_forward import layer_table
    layers = {L.pattern: L for L in layer_table(_patterns_student().prior.transformer)}
    q = torch.zeros(2, 48, 2, 16, dtype=torch.float64)
    for L in layers.values():
        assert pl._block_local(L, q[:, 13:], q[:, 13:], q[:, 13:], q[:, :13], q[:, :13]) is None   # P % C
        assert pl._block_local(L, q[:, :13], q[:, :13], q[:, :13]) is None                         # prefix % C
        assert pl._block_local(L, q[:, 8:44], q[:, 8:44], q[:, 8:44], q[:, :8], q[:, :8]) is None   # window % C
    dense = layer_table(__import__("fastjukebox").transformer.Transformer(32, 48, 2, 1, 0, 6))[0]
    assert dense.pattern == "dense" and pl._block_local(dense, q[:, :8], q[:, :8], q[:, :8]) is None


def test_the_cached_passes_take_the_block_local_path(monkeypatch):
    """Where the prefix ends on a block boundary, neither the prefix nor a pass goes through
    ``attend``'s reshapes (a check that the fast path is the one the sampler runs)."""
    from distill import prefix_layout as pl
    student = _patterns_student()
    c = student.config
    g = torch.Generator().manual_seed(0)
    upper, labels = _inputs(c, 2, g)
    tokens = torch.randint(0, c.l_bins + 1, (2, c.n_ctx), generator=g)

    def refuse(*args, **kw):
        raise AssertionError("attend's path ran")
    with torch.no_grad():
        cond = student.condition(upper, labels)
        monkeypatch.setattr(pl, "_attend", refuse)
        monkeypatch.setattr(pl, "_attend_suffix", refuse)
        cache = student.prefix_cache(tokens[:, :16], cond)
        student.prior(tokens, cond.start, cond.x_cond, cache=cache, positions=torch.tensor([[20, 47], [16, 30]]))
        with pytest.raises(AssertionError, match="attend's path ran"):
            student.prefix_cache(tokens[:, :13], cond)          # not a block boundary: attend's path


def _scored_rows(n_rows, S, T, g):
    """(n_rows, S) distinct positions in [0, T) per row, in no order."""
    return torch.stack([torch.randperm(T, generator=g)[:S] for _ in range(n_rows)])


@pytest.mark.parametrize("layout", ["tokens", "shifted"])
@pytest.mark.parametrize("P", [8, 16, 13, 1])
@pytest.mark.parametrize("S", ["none", 1, 5, "all"])
def test_last_layer_at_the_scored_rows_equals_the_full_pass_in_float64(P, S, layout):
    """Hidden states of the scored rows only (the last layer's attention output, MLP and norms run
    at those rows) equal the full pass's rows; the logits of ``positions`` equal the full window's:
    none scored, all scored, odd counts, on and off block boundaries."""
    from distill.prefix_layout import suffix_forward
    student = _patterns_student(layout=layout)
    c = student.config
    g = torch.Generator().manual_seed(P)
    upper, labels = _inputs(c, 3, g)
    tokens = torch.randint(0, c.l_bins + 1, (3, c.n_ctx), generator=g)
    tokens[:, :P] = torch.randint(0, c.l_bins, (3, P), generator=g)
    T = c.n_ctx - P
    S = {"none": 0, "all": T}.get(S, S)
    rows = _scored_rows(3, S, T, g)
    m = student.prior
    with torch.no_grad():
        cond = student.condition(upper, labels)
        cache = student.prefix_cache(tokens[:, :P], cond)
        x = m.embed(tokens[:, P:], cond.start, cond.x_cond, P, tokens[:, P - 1:P])
        every = suffix_forward(m.transformer, x, cache)
        some = suffix_forward(m.transformer, x, cache, rows)
        full = m(tokens, cond.start, cond.x_cond, prefix_len=P)
        logits = m(tokens, cond.start, cond.x_cond, cache=cache, positions=rows + P)
    assert some.shape == (3, S, c.width) and logits.shape == (3, S, c.l_bins)
    torch.testing.assert_close(some, every.gather(1, rows[..., None].expand(-1, -1, c.width)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, full.gather(1, (rows + P)[..., None].expand(-1, -1, c.l_bins)),
                               rtol=1e-12, atol=1e-12)
    if S:
        assert logits.std() > 0.1


def test_block_forward_rows_are_the_full_blocks_rows():
    from fastjukebox.block_forward import block_forward, layer_table
    from fastjukebox.transformer import TeacherForced
    student = _patterns_student()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * 48, 32, generator=g, dtype=torch.float64)
    rows = torch.tensor([95, 0, 47, 48, 3, 3])
    for L in layer_table(student.prior.transformer):
        att = TeacherForced(2, 48, causal=False)
        want = block_forward(L, x, att)[rows]
        got = block_forward(L, x, att, rows=rows)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        # a layer whose attention sees no key: the projection's bias at the chosen rows
        torch.testing.assert_close(block_forward(L, x, lambda L, h: None, rows=rows),
                                   block_forward(L, x, lambda L, h: None)[rows], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", ["confidence", "spread"])
@pytest.mark.parametrize("K", [16, 13])
def test_sampler_draws_what_the_attend_path_draws(monkeypatch, K, order):
    """The sampler with the block-local attention and the last layer at the scored rows draws the
    same codes, from the same generators, as with every layer through ``attend`` over all rows
    (a float64 student: its logits agree to rounding, far below any draw's margin)."""
    from distill import prefix_layout as pl
    from fastjukebox.sample_seeds import SampleGenerators
    student = _patterns_student(layout="shifted")
    c = student.config
    g = torch.Generator().manual_seed(K)
    upper, labels = _inputs(c, 3, g)
    known = torch.randint(0, c.l_bins, (3, K), generator=g)

    def sample():
        sampler = ParallelWindowSampler(student, passes=3, prefix_cache=True, confidence_noise=0.0,
                                        temperature_scale=0.7, order=order)
        return sampler(known, c.n_ctx - K, upper, labels, generator=SampleGenerators([1, 2, 3]))
    fast = sample()
    block_forward = pl.block_forward

    def every_row(L, x, attention, rows=None):
        y = block_forward(L, x, attention)
        return y if rows is None else y.index_select(0, rows)
    monkeypatch.setattr(pl, "_block_local", lambda *a, **kw: None)
    monkeypatch.setattr(pl, "block_forward", every_row)
    slow = sample()
    assert torch.equal(fast, slow)
    assert (fast[:, K:] != fast[:1, K:]).any()          # rows drew differently: a real comparison


def test_passes_add_the_positions_inputs_summed_once_per_window():
    """``encode_prefix`` sums the later positions' position embeddings, label start and
    conditioning once (``position_inputs``); every pass adds that sum to its code embeddings,
    which equals ``embed``'s own sum to rounding, and is what the passes read."""
    student = _patterns_student(layout="shifted")
    c = student.config
    g = torch.Generator().manual_seed(3)
    upper, labels = _inputs(c, 2, g)
    tokens = torch.randint(0, c.l_bins + 1, (2, c.n_ctx), generator=g)
    m = student.prior
    with torch.no_grad():
        cond = student.condition(upper, labels)
        cache = student.prefix_cache(tokens[:, :16], cond)
        assert cache.suffix_inputs.shape == (2, c.n_ctx - 16, c.width)
        summed = m.embed(tokens[:, 16:], cond.start, cond.x_cond, 16, tokens[:, 15:16], cache.suffix_inputs)
        plain = m.embed(tokens[:, 16:], cond.start, cond.x_cond, 16, tokens[:, 15:16])
        torch.testing.assert_close(summed, plain, rtol=1e-14, atol=1e-14)
        assert m.position_inputs(None, None, 16, c.n_ctx).shape == (c.n_ctx - 16, c.width)
        positions = torch.tensor([[16, 40], [30, 47]])
        before = m(tokens, cond.start, cond.x_cond, cache=cache, positions=positions)
        cache.suffix_inputs = cache.suffix_inputs + 1.0
        assert (m(tokens, cond.start, cond.x_cond, cache=cache, positions=positions) - before).abs().max() > 1e-3
