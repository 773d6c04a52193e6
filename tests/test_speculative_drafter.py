"""Speculative sampling drafted by a ``FeatureDrafter`` (``distill.drafter``): exact, greedy, named errors."""
import numpy as np
import pytest
import torch

import distill.speculative as spec
from distill.drafter import DrafterConfig, FeatureDrafter
from distill.speculative import SpeculativeWindowSampler
from fastjukebox import Prior, PriorConfig, load_prior
from fastjukebox.checkpoint import CheckpointError
from fastjukebox.decoding import WindowDecoder
from fastjukebox.sample_seeds import SampleGenerators
from test_speculative import LEVEL, _chi_square_pvalue, _random_pair, _teacher_joint

from conftest import DATA

DRAWS = 20000


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _random_drafter(teacher: Prior, seed=0, scale=0.4, depth=2, block_norm=True) -> FeatureDrafter:
    """A drafter with random weights: its proposals have little to do with the teacher's."""
    torch.manual_seed(seed)
    d = FeatureDrafter.from_teacher(teacher, hidden=24, depth=depth, block_norm=block_norm).to(teacher.dtype).eval()
    for p in d.parameters():
        p.normal_(0, scale)
    return d


def _histogram(teacher, drafter, upper, known, n_new, temperature, top_k, gamma, seed=1, rows_apart=True):
    sampler = SpeculativeWindowSampler(teacher, drafter=drafter, gamma=gamma)
    sampler.rows_apart = rows_apart
    out = sampler(known.expand(DRAWS, -1), n_new, upper.expand(DRAWS, -1), None, temperature=temperature,
                  top_k=top_k, generator=torch.Generator().manual_seed(seed))
    V = teacher.config.l_bins
    index = (out[:, known.shape[1]:] * V ** torch.arange(n_new - 1, -1, -1)).sum(dim=1)
    return torch.bincount(index, minlength=V ** n_new).double(), sampler.reports[-1]


# K 0: the teacher draws the first position itself; K 2: chunks stop at the block boundary (4);
# K 5: top-k and a lower temperature. Batch DRAWS: rows decide different lengths per call.
CASES = [dict(known=0, n_new=3, temperature=1.0, top_k=0, gamma=4),
         dict(known=2, n_new=3, temperature=1.0, top_k=0, gamma=4),
         dict(known=5, n_new=3, temperature=0.7, top_k=3, gamma=2)]


@pytest.mark.parametrize("rows_apart", [True, False], ids=["rows-apart", "shared-position"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"K{c['known']}-T{c['temperature']}-k{c['top_k']}")
def test_samples_follow_the_teacher_exactly(case, rows_apart):
    """Batch DRAWS: rows move on by themselves (each from its own position), or share the
    slowest row's position with the others' tokens held."""
    teacher, _, upper = _random_pair()
    drafter = _random_drafter(teacher)
    known = torch.randint(0, 4, (1, case["known"]), generator=torch.Generator().manual_seed(3))
    joint = _teacher_joint(teacher, upper, known, case["n_new"], case["temperature"], case["top_k"])
    counts, report = _histogram(teacher, drafter, upper, known, case["n_new"], case["temperature"],
                                case["top_k"], case["gamma"], rows_apart=rows_apart)
    assert 0.2 < report.acceptance < 0.9          # rejected often: the residual path runs throughout
    assert report.drafter_steps > 0 and report.student_passes == 0
    if rows_apart:   # positions drawn from the teacher after a kept chunk (no draft judged there) too
        after_kept = report.new_tokens - report.verified - (DRAWS if case["known"] == 0 else 0)
        assert after_kept > DRAWS // 10
    assert _chi_square_pvalue(counts, joint) > LEVEL


@pytest.mark.parametrize("mutation", ["accept all", "correct from p", "draw not from q"])
def test_a_wrong_rule_fails_the_same_test(mutation, monkeypatch):
    """Keeping every draft, correcting from p, or drafts drawn from another distribution than the
    stored q each make the chi-square test fail."""
    if mutation == "accept all":
        monkeypatch.setattr(spec, "accept", lambda p_x, q_x, u: torch.ones_like(u, dtype=torch.bool))
    elif mutation == "correct from p":
        monkeypatch.setattr(spec, "residual", lambda p, q: p)
    else:      # drafts not from the stored q (the step loop: from probs ** 3; ``chain``: a tilted race)
        import distill.draft as draft
        import distill.drafter as drafter_module
        real, real_winner = draft.categorical_draw, drafter_module.race_winner
        monkeypatch.setattr(draft, "categorical_draw", lambda probs, generator=None, noise=None: real(probs ** 3, generator, noise))
        # ``chain``'s race is ``logits - log E``: a tilt towards higher codes draws from another distribution
        monkeypatch.setattr(drafter_module, "race_winner",
                            lambda race, out=None, values=None:
                            real_winner(race + torch.arange(race.shape[-1]), out, values))
    case = CASES[1]
    teacher, _, upper = _random_pair()
    known = torch.randint(0, 4, (1, case["known"]), generator=torch.Generator().manual_seed(3))
    joint = _teacher_joint(teacher, upper, known, case["n_new"], case["temperature"], case["top_k"])
    counts, _ = _histogram(teacher, _random_drafter(teacher), upper, known, case["n_new"], case["temperature"],
                           case["top_k"], case["gamma"])
    assert _chi_square_pvalue(counts, joint) < LEVEL


@pytest.mark.parametrize("temperature,top_k,gamma", [(1.0, 0, 3), (0.7, 3, 8)])
def test_one_row_path_makes_the_batched_decisions(temperature, top_k, gamma):
    teacher, _, upper = _random_pair(l_bins=8, n_ctx=8)
    drafter = _random_drafter(teacher)
    fast = SpeculativeWindowSampler(teacher, drafter=drafter, gamma=gamma)
    slow = SpeculativeWindowSampler(teacher, drafter=drafter, gamma=gamma)
    slow.one_row_fast_path = False
    corrections = 0
    for seed in range(30):
        known = torch.randint(0, 8, (1, seed % 4))
        kw = dict(temperature=temperature, top_k=top_k)
        a = fast(known, 8 - known.shape[1], upper, None, generator=torch.Generator().manual_seed(seed), **kw)
        b = slow(known, 8 - known.shape[1], upper, None, generator=torch.Generator().manual_seed(seed), **kw)
        assert torch.equal(a, b), seed
        assert fast.reports[-1] == slow.reports[-1], seed
        corrections += fast.reports[-1].verified - fast.reports[-1].accepted
    assert corrections > 20


def test_rows_of_a_batch_draw_what_they_would_alone():
    """With one generator per row, a row's sample does not depend on the rest of its batch: each
    row drafts, is judged and advances from its own position. (With the rows sharing the slowest
    one's position, rows ahead draft from another feature and some samples change.)"""
    teacher, _, _ = _random_pair(l_bins=4, n_ctx=16)
    teacher = teacher.double()
    drafter = _random_drafter(teacher, scale=1.0)
    c = teacher.config
    g = torch.Generator().manual_seed(4)
    upper = torch.randint(0, 4, (8, c.n_ctx // c.cond_downsample), generator=g)
    known = torch.randint(0, 4, (8, 3), generator=g)
    seeds = list(range(11, 19))
    changed = {}
    for rows_apart in (True, False):
        sampler = SpeculativeWindowSampler(teacher, drafter=drafter, gamma=3)
        sampler.rows_apart = rows_apart
        batch = sampler(known, 13, upper, None, generator=SampleGenerators(seeds))
        alone = torch.cat([sampler(known[i:i + 1], 13, upper[i:i + 1], None, generator=SampleGenerators(seeds[i:i + 1]))
                           for i in range(8)])
        changed[rows_apart] = int((batch != alone).sum())
    assert changed[True] == 0
    assert changed[False] > 0


@pytest.mark.parametrize("name", ["tiny_upsampler_level_0", "tiny_upsampler_level_1"])
@pytest.mark.parametrize("gamma", [1, 3, 16])
def test_greedy_reproduces_the_original_fixtures(name, gamma):
    prior = load_prior(DATA / f"{name}.pth.tar", dtype=torch.float64)
    io = np.load(DATA / f"{name}_io.npz")
    z, upper, y = (torch.from_numpy(io[k]) for k in ("z", "z_cond", "y"))
    sampler = SpeculativeWindowSampler(prior, drafter=_random_drafter(prior, scale=0.1), gamma=gamma)
    prefix = int(io["greedy_prefix_len"])
    for K, key in ((0, "greedy_ancestral"), (prefix, "greedy_primed")):
        out = sampler(z[:, :K], prior.config.n_ctx - K, upper, y, temperature=0.0,
                      chunk_size=int(io["greedy_chunk_size"]))
        assert np.array_equal(out.numpy(), io[key])


ARCHITECTURES = [dict(depth=2, block_norm=True), dict(depth=1, block_norm=False), dict(depth=2, block_norm=False),
                 dict(depth=0, block_norm=False)]


def _arch_id(arch: dict) -> str:
    return f"depth{arch['depth']}-{'norm' if arch['block_norm'] else 'nonorm'}"


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=_arch_id)
def test_folded_step_equals_the_plain_forward(arch):
    """``begin`` + ``step`` (embeddings folded into the projection) compute ``forward``, for every
    block layout."""
    teacher, _, upper = _random_pair()
    teacher = teacher.double()
    d = _random_drafter(teacher, **arch)
    c = teacher.config
    x_cond = teacher.condition(upper.expand(3, -1)).x_cond
    g = torch.Generator().manual_seed(0)
    feature, prev = torch.randn(3, c.width, generator=g, dtype=torch.float64), torch.randint(0, c.l_bins, (3,), generator=g)
    d.begin(x_cond, 3)
    for t in (1, 5, 7):
        plain = d(feature, d.inputs(prev, torch.full((3,), t), x_cond[:, t]))
        torch.testing.assert_close(d.step(feature, prev, t), plain, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d.step_logits(plain), d.logits(plain), rtol=1e-12, atol=1e-12)
    rows = d.step(feature, prev, torch.tensor([1, 5, 7]))          # each row its own position
    for n, t in enumerate((1, 5, 7)):
        torch.testing.assert_close(rows[n], d(feature, d.inputs(prev, torch.full((3,), t), x_cond[:, t]))[n],
                                   rtol=1e-12, atol=1e-12)
    assert not torch.allclose(d.step(feature, prev, 1), d.step(feature, prev, 2))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=_arch_id)
def test_chain_drafts_what_the_steps_draft(temperature, per_row, arch):
    """``chain`` (one norm per drafted feature, the norms' scales folded into the weights, the race
    on the logits; blocks without a norm with their output biases moved into the input) gives the
    logits / T of ``step`` + ``step_logits`` and draws the ids the exponential race on their
    softmax draws from the same noise, each drafted id being the next position's input; in
    float64, one start for the batch or each row its own, for every block layout."""
    teacher, _, _ = _random_pair()
    teacher = teacher.double()
    d = _random_drafter(teacher, scale=0.3, **arch)
    c = teacher.config
    g = torch.Generator().manual_seed(6)
    upper = torch.randint(0, c.l_bins, (3, c.n_ctx // c.cond_downsample), generator=g)
    x_cond = teacher.condition(upper).x_cond
    d.begin(x_cond, 3)
    for p in d.parameters():      # nonzero shifts and scales in every norm, so the folding matters
        assert p.abs().sum() > 0
    count = 4
    lo = torch.tensor([1, 3, 2]) if per_row else 2
    feature = torch.randn(3, c.width, generator=g, dtype=torch.float64)
    prev = torch.randint(0, c.l_bins, (3,), generator=g)
    noise = torch.empty(count, 3, c.l_bins, dtype=torch.float64).exponential_(generator=g)
    ids = torch.full((count, 3), -1, dtype=torch.long)
    logits = d.chain(feature, prev, lo, count, noise.log(), temperature, ids)
    f, x = feature, prev
    for j in range(count):
        f = d.step(f, x, lo + j)
        want = d.step_logits(f) / temperature
        torch.testing.assert_close(logits[j], want, rtol=1e-10, atol=1e-10)
        x = spec.categorical_draw(torch.softmax(want, -1), noise=noise[j])
        assert torch.equal(ids[j], x), j
    assert len(set(ids.flatten().tolist())) > 1


@pytest.mark.parametrize("block_norm", [True, False], ids=["norm", "nonorm"])
def test_chained_drafts_are_the_step_loops_drafts(block_norm):
    """The sampler drafting with ``chain`` returns the step loop's samples and reports, batch 1 and
    a batch whose rows move apart (fp32: the same draws up to rounding), blocks with or without norms."""
    teacher, _, upper = _random_pair(l_bins=8, n_ctx=16)
    drafter = _random_drafter(teacher, block_norm=block_norm)
    c = teacher.config
    g = torch.Generator().manual_seed(8)
    uppers = torch.randint(0, 8, (4, c.n_ctx // c.cond_downsample), generator=g)
    samples = {}
    for chained in (True, False):
        sampler = SpeculativeWindowSampler(teacher, drafter=drafter, gamma=5)
        sampler.drafter.chained = chained
        one = [sampler(torch.randint(0, 8, (1, 3), generator=torch.Generator().manual_seed(s)), 13, upper, None,
                       generator=torch.Generator().manual_seed(s)) for s in range(12)]
        batch = sampler(torch.randint(0, 8, (4, 2), generator=g.manual_seed(9)), 14, uppers, None,
                        generator=SampleGenerators([3, 4, 5, 6]))
        samples[chained] = (torch.cat(one), batch, [r.to_dict() for r in sampler.reports])
    assert torch.equal(samples[True][0], samples[False][0])
    assert torch.equal(samples[True][1], samples[False][1])
    assert samples[True][2] == samples[False][2]
    assert sum(r["drafter_steps"] for r in samples[True][2]) > 50


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.0), (0.7, 0, 0.0), (0.7, 3, 0.0), (0.9, 0, 0.8),
                                                     (0.0, 0, 0.0)])
def test_step_probs_is_the_filtered_distribution_of_the_step_logits(temperature, top_k, top_p):
    """The head with the temperature folded in gives the distribution the sampler's filter gives
    for the step's logits (fp32 rounding), for every filter."""
    teacher, _, upper = _random_pair()
    d = _random_drafter(teacher, scale=1.0)
    c = teacher.config
    d.begin(teacher.condition(upper.expand(3, -1)).x_cond, 3)
    g = torch.Generator().manual_seed(5)
    feature = torch.randn(3, c.width, generator=g)
    h = d.step(feature, torch.tensor([2, 0, 1]), 4)
    want = spec.proposal_probs(d.step_logits(h), temperature, top_k, top_p)
    out = torch.full_like(want, float("nan"))
    got = d.step_probs(h, temperature, top_k, top_p, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.step_probs(h, temperature, top_k, top_p), want, rtol=1e-5, atol=1e-6)
    if temperature > 0:     # not one-hot: the temperature matters
        assert float(want.max(-1).values.min()) < 0.99


def test_decoder_hands_out_the_features_of_the_last_forward():
    teacher, _, upper = _random_pair()
    c = teacher.config
    z = torch.randint(0, c.l_bins, (2, c.n_ctx), generator=torch.Generator().manual_seed(1))
    dec = WindowDecoder(teacher, 2)
    dec.begin(upper.expand(2, -1), None)
    dec.prime(z[:, :3], chunk_size=2)
    primed = dec.hidden(2)
    dec.token_buffer[:, 3:6] = z[:, 3:6]
    logits = dec.score(1)
    torch.testing.assert_close(teacher.prior.head(dec.hidden(3)[:, None], dec.conditioning.x_cond[:, 3:4])[:, 0],
                               logits[:, 0])
    cond = teacher.condition(upper.expand(2, -1))
    full = teacher.prior.transformer(teacher.prior.inputs(z, cond.start, cond.x_cond))
    torch.testing.assert_close(primed, full[:, 2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not position 2"):
        dec.hidden(2)                     # the score ran position 3 only


@pytest.mark.parametrize("block_norm", [True, False], ids=["norm", "nonorm"])
def test_save_and_load_round_trip(tmp_path, block_norm):
    teacher, _, _ = _random_pair()
    d = _random_drafter(teacher, block_norm=block_norm)
    d.save(tmp_path / "drafter_level_0")
    back = FeatureDrafter.load(tmp_path / "drafter_level_0")
    assert back.config == d.config and back.config.block_norm is block_norm
    for (name, a), (_, b) in zip(d.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    (tmp_path / "drafter_level_0" / "config.json").write_text('{"kind": "student", "format": 1}')
    with pytest.raises(CheckpointError, match="not a valid drafter config"):
        FeatureDrafter.load(tmp_path / "drafter_level_0")
    with pytest.raises(CheckpointError, match="not a drafter directory"):
        FeatureDrafter.load(tmp_path)


def test_bad_input_is_named():
    teacher, student, _ = _random_pair()
    drafter = _random_drafter(teacher)
    with pytest.raises(ValueError, match="gamma .* >= 1, got 0"):
        SpeculativeWindowSampler(teacher, drafter=drafter, gamma=0)
    for change, what in ((dict(level=1), "level is 1, the prior's 0"), (dict(l_bins=5), "codebook size is 5"),
                         (dict(width=8), "width is 8, the prior's 16"), (dict(n_ctx=16), "window \\(n_ctx\\) is 16")):
        other = FeatureDrafter(DrafterConfig(**{**vars(drafter.config), **change}))
        with pytest.raises(ValueError, match=f"another prior: its {what}"):
            SpeculativeWindowSampler(teacher, drafter=other)
    with pytest.raises(TypeError, match="FeatureDrafter"):
        SpeculativeWindowSampler(teacher, drafter=student)
    with pytest.raises(ValueError, match="hidden must be an integer >= 1"):
        DrafterConfig(level=0, l_bins=4, n_ctx=8, width=16, hidden=0)
    with pytest.raises(ValueError, match="depth must be an integer >= 0"):
        DrafterConfig(level=0, l_bins=4, n_ctx=8, width=16, depth=-1)
    with pytest.raises(ValueError, match="block_norm must be true or false"):
        DrafterConfig(level=0, l_bins=4, n_ctx=8, width=16, block_norm=1)
    with pytest.raises(ValueError, match="exceed the window"):
        SpeculativeWindowSampler(teacher, drafter=drafter)(torch.zeros(1, 4, dtype=torch.long), 5)


def test_from_disable_at_batch_rows_the_window_is_decoded_token_by_token():
    """At ``disable_at_batch`` rows or more the sampler draws what ``"ar"`` draws from the same
    generator, drafting nothing; below, it drafts (and is exact either way: the chi-square tests)."""
    from fastjukebox.sampling import ARWindowSampler
    teacher, _, upper = _random_pair(l_bins=16, n_ctx=16)
    drafter = _random_drafter(teacher, scale=0.1)
    sampler = SpeculativeWindowSampler(teacher, drafter=drafter, gamma=3, disable_at_batch=3)
    known = torch.randint(0, 16, (3, 5), generator=torch.Generator().manual_seed(2))
    up = upper.expand(3, -1)
    for rows in (3, 4):
        z = known[:1].expand(rows, -1) if rows == 4 else known
        got = sampler(z, 9, upper.expand(rows, -1), None, temperature=0.9, generator=torch.Generator().manual_seed(5))
        want = ARWindowSampler(teacher, rows)(z, 9, upper.expand(rows, -1), None, temperature=0.9,
                                              generator=torch.Generator().manual_seed(5))
        assert torch.equal(got, want)
        report = sampler.reports[-1]
        assert report.drafted == 0 and report.teacher_calls == 9 and report.new_tokens == rows * 9
    two = sampler(known[:2], 9, up[:2], None, temperature=0.9, generator=torch.Generator().manual_seed(5))
    assert sampler.reports[-1].drafted > 0 and sampler.reports[-1].teacher_calls < 9
    assert torch.equal(two[:, :5], known[:2]) and two.shape == (2, 14)
    for bad in (0, -1, True, 2.0, "4"):
        with pytest.raises(ValueError, match="disable_at_batch must be an integer >= 1 or None"):
            SpeculativeWindowSampler(teacher, drafter=drafter, disable_at_batch=bad)


def test_the_speculative_sampler_takes_the_devices_crossover_unless_told():
    import fastjukebox
    from fastjukebox.samplers import SAMPLERS
    jb = fastjukebox.load("demo")
    assert SAMPLERS["speculative"](jb, 0).disable_at_batch == spec.DISABLE_AT_BATCH["cpu"]
    assert SAMPLERS["speculative"](jb, 0, disable_at_batch=64).disable_at_batch == 64


def test_a_family_reads_its_drafters_and_names_a_misplaced_one(tmp_path):
    """``drafter_level_{L}/`` beside the priors: ``"speculative"`` drafts with it (no student
    needed); a drafter of another level in the slot is a named error at load."""
    import shutil

    import fastjukebox
    from distill.draft import FeatureDraft
    from fastjukebox.bundle import ASSETS
    from fastjukebox.samplers import SAMPLERS, choose_samplers
    family = tmp_path / "demo"
    shutil.copytree(ASSETS / "demo", family)
    shutil.rmtree(family / "student_level_1")
    jb = fastjukebox.load(family)
    assert jb.drafter(0).config.level == 0 and jb.drafter(1).config.level == 1
    assert choose_samplers(jb, "speculative", jb.upsampler_levels) == {1: "speculative", 0: "speculative"}
    assert isinstance(SAMPLERS["speculative"](jb, 1).drafter, FeatureDraft)
    shutil.rmtree(family / "drafter_level_1")
    with pytest.raises(ValueError, match="no parallel student for level 1"):
        choose_samplers(fastjukebox.load(family), "speculative", (1, 0))
    shutil.rmtree(family / "drafter_level_0")
    shutil.copytree(ASSETS / "demo" / "drafter_level_1", family / "drafter_level_0")
    with pytest.raises(CheckpointError, match="holds a drafter for level 1, not level 0"):
        fastjukebox.load(family)
