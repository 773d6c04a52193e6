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
