"""Exact speculative sampling: the student drafts, the teacher verifies (``distill.speculative``)."""
import itertools

import numpy as np
import pytest
import torch

import distill.speculative as spec
import fastjukebox
from distill.draft import span_bounds
from distill.speculative import SpeculativeWindowSampler
from distill.student import ParallelStudent
from fastjukebox import Prior, PriorConfig, load_prior
from fastjukebox.bundle import Jukebox
from fastjukebox.cli import main as cli_main
from fastjukebox.decoding import WindowDecoder
from kernels.sampling.reference import sampling_probs
from fastjukebox.sampling import ARWindowSampler

from conftest import DATA


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# --- a small random teacher and a deliberately poor draft --------------------------------------
def _random_pair(l_bins=4, n_ctx=8, seed=0):
    """Random upsampler teacher (n_ctx 8 in blocks of 4, ``l_bins`` codes, sharp distributions) and
    an independently random student: its proposals have little to do with the teacher's."""
    cfg = PriorConfig(level=0, n_ctx=n_ctx, width=16, depth=2, heads=1, attn_order=2, blocks=2, l_bins=l_bins,
                      labels=False, cond_width=8, cond_depth=1, cond_dilation_cycle=None)
    torch.manual_seed(seed)
    teacher = Prior(cfg).eval()
    student = ParallelStudent(cfg).eval()
    for p in list(teacher.parameters()) + list(student.parameters()):
        p.normal_(0, 0.4)
    upper = torch.randint(0, l_bins, (1, n_ctx // cfg.cond_downsample))
    return teacher, student, upper


def _teacher_joint(teacher, upper, known, n_new, temperature, top_k):
    """Exact probability of every continuation of ``known`` (1, K) under the filtered teacher:
    the product of its per-position conditionals (teacher-forced logits). -> (V ** n_new,)."""
    c = teacher.config
    K = known.shape[1]
    seqs = torch.tensor(list(itertools.product(range(c.l_bins), repeat=n_new)))
    z = torch.zeros(len(seqs), c.n_ctx, dtype=torch.long)
    z[:, :K] = known
    z[:, K:K + n_new] = seqs
    logits = teacher.logits(z, upper.expand(len(seqs), -1), None)[:, K:K + n_new]
    p = sampling_probs(logits, temperature, top_k)
    return p.gather(-1, seqs[..., None])[..., 0].prod(dim=1)


def _chi_square_pvalue(counts, probs, min_expected=5.0):
    """Pearson chi-square of ``counts`` against ``probs``, cells expected below ``min_expected``
    pooled; p-value from the regularised upper incomplete gamma function."""
    n = counts.sum()
    expected = probs * n
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = torch.tensor(float(len(obs) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


DRAWS = 20000
LEVEL = 1e-3     # the test's significance level


def _speculative_histogram(teacher, student, upper, known, n_new, temperature, top_k, gamma, seed=1):
    sampler = SpeculativeWindowSampler(teacher, student, gamma=gamma)
    gen = torch.Generator().manual_seed(seed)
    out = sampler(known.expand(DRAWS, -1), n_new, upper.expand(DRAWS, -1), None, temperature=temperature,
                  top_k=top_k, generator=gen)
    V = teacher.config.l_bins
    index = (out[:, known.shape[1]:] * V ** torch.arange(n_new - 1, -1, -1)).sum(dim=1)
    return torch.bincount(index, minlength=V ** n_new).double(), sampler.reports[-1]


@pytest.mark.parametrize("temperature,top_k,gamma", [(1.0, 0, 3), (0.7, 3, 8)])
def test_one_row_path_makes_the_batched_decisions(temperature, top_k, gamma):
    """Batch 1 takes a scalar path; with the same random numbers it decides exactly as the batched
    rule (which the chi-square test checks), over many windows with rejections and corrections."""
    teacher, student, upper = _random_pair(l_bins=8, n_ctx=8)
    fast = SpeculativeWindowSampler(teacher, student, gamma=gamma)
    slow = SpeculativeWindowSampler(teacher, student, gamma=gamma)
    slow.one_row_fast_path = False
    corrections = 0
    for seed in range(40):
        known = torch.randint(0, 8, (1, seed % 4))
        kw = dict(temperature=temperature, top_k=top_k)
        a = fast(known, 8 - known.shape[1], upper, None, generator=torch.Generator().manual_seed(seed), **kw)
        b = slow(known, 8 - known.shape[1], upper, None, generator=torch.Generator().manual_seed(seed), **kw)
        assert torch.equal(a, b), seed
        ra, rb = fast.reports[-1], slow.reports[-1]
        assert ra == rb, seed
        corrections += ra.verified - ra.accepted
    assert corrections > 20          # the poor draft is rejected often: the residual path ran


# three new positions crossing the block boundary at 4 (chunks stop there), and the window's end
CASES = [dict(known=2, n_new=3, temperature=1.0, top_k=0, gamma=4),
         dict(known=5, n_new=3, temperature=0.7, top_k=3, gamma=2)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"K{c['known']}-T{c['temperature']}-k{c['top_k']}")
def test_samples_follow_the_teacher_exactly(case):
    teacher, student, upper = _random_pair()
    known = torch.randint(0, 4, (1, case["known"]), generator=torch.Generator().manual_seed(3))
    joint = _teacher_joint(teacher, upper, known, case["n_new"], case["temperature"], case["top_k"])
    counts, report = _speculative_histogram(teacher, student, upper, known, case["n_new"], case["temperature"],
                                            case["top_k"], case["gamma"])
    # The draft is poor (many rejections), so the residual path is exercised throughout.
    assert 0.2 < report.acceptance < 0.9
    assert _chi_square_pvalue(counts, joint) > LEVEL


@pytest.mark.parametrize("mutation", ["accept p", "correct from p", "accept all"])
def test_a_wrong_rule_fails_the_same_test(mutation, monkeypatch):
    if mutation == "accept p":      # forgets q: keeps a draft with probability p(x)
        monkeypatch.setattr(spec, "accept", lambda p_x, q_x, u: u < p_x)
    elif mutation == "correct from p":   # draws rejected positions from p instead of the residual
        monkeypatch.setattr(spec, "residual", lambda p, q: p)
    else:                           # keeps every draft: the samples follow the poor draft
        monkeypatch.setattr(spec, "accept", lambda p_x, q_x, u: torch.ones_like(u, dtype=torch.bool))
    case = CASES[0]
    teacher, student, upper = _random_pair()
    known = torch.randint(0, 4, (1, case["known"]), generator=torch.Generator().manual_seed(3))
    joint = _teacher_joint(teacher, upper, known, case["n_new"], case["temperature"], case["top_k"])
    counts, _ = _speculative_histogram(teacher, student, upper, known, case["n_new"], case["temperature"],
                                       case["top_k"], case["gamma"])
    assert _chi_square_pvalue(counts, joint) < LEVEL


# --- greedy parity ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny_upsampler_level_0", "tiny_upsampler_level_1"])
@pytest.mark.parametrize("gamma", [1, 3, 16])
def test_greedy_reproduces_the_original_fixtures(name, gamma):
    """Temperature 0 gives the teacher's argmax at every position: the original's greedy runs."""
    prior = load_prior(DATA / f"{name}.pth.tar", dtype=torch.float64)
    io = np.load(DATA / f"{name}_io.npz")
    z, upper, y = (torch.from_numpy(io[k]) for k in ("z", "z_cond", "y"))
    sampler = SpeculativeWindowSampler(prior, ParallelStudent.from_teacher(prior), gamma=gamma)
    prefix = int(io["greedy_prefix_len"])
    for K, key in ((0, "greedy_ancestral"), (prefix, "greedy_primed")):
        out = sampler(z[:, :K], prior.config.n_ctx - K, upper, y, temperature=0.0,
                      chunk_size=int(io["greedy_chunk_size"]))
        assert np.array_equal(out.numpy(), io[key])
    assert all(r.teacher_calls >= r.new_tokens / z.shape[0] / gamma for r in sampler.reports)


@pytest.mark.parametrize("level", [1, 0])
def test_greedy_equals_ar_on_the_demo(level):
    """A hopped demo window (512 known codes, 512 new) at batch 2, drafted by the shipped student."""
    jb = fastjukebox.load("demo")
    prior, c = jb.prior(level), jb.prior(level).config
    gen = torch.Generator().manual_seed(level)
    upper = torch.randint(0, c.l_bins, (2, c.n_ctx // c.cond_downsample), generator=gen)
    labels = torch.tensor([[44100 * 30, 0, c.sample_length, 1, 0]] * 2)[:, :c.label_len] if c.labels else None
    known = torch.randint(0, c.l_bins, (2, 512), generator=gen)
    ar = ARWindowSampler(prior, 2)(known, 512, upper, labels, top_k=1)
    sampler = SpeculativeWindowSampler(prior, jb.student(level), gamma=8)
    assert torch.equal(sampler(known, 512, upper, labels, temperature=0.0), ar)
    r = sampler.reports[-1]
    assert r.new_tokens == 1024 and r.accepted <= r.verified <= r.new_tokens and r.student_passes == 1
    assert r.teacher_calls < 512          # the shipped student's drafts are accepted often
    assert sampler.progress_note() == f"accept {r.accepted / r.verified:.0%}, {512 / r.teacher_calls:.2f} positions/call"


# --- the teacher's chunked scoring and rollback ----------------------------------------------
def test_score_equals_steps_and_rewind_resumes():
    teacher, _, upper = _random_pair(l_bins=6)
    teacher.double()
    dec = WindowDecoder(teacher, 2)
    ids = torch.randint(0, 6, (2, 8), generator=torch.Generator().manual_seed(0))
    dec.begin(upper.expand(2, -1), None)
    stepped = []
    for t in range(8):
        stepped.append(dec.step())
        dec.push(ids[:, t])
    dec.begin(upper.expand(2, -1), None)
    dec.prime(ids[:, :1])
    dec.token_buffer[:, 1:3] = ids[:, 1:3]
    torch.testing.assert_close(dec.score(3), torch.stack(stepped[1:4], 1), rtol=0, atol=1e-10)
    dec.begin(upper.expand(2, -1), None)
    dec.prime(ids[:, :1])
    dec.token_buffer[:, 1] = (ids[:, 1] + 1) % 6     # a wrong proposal at position 1
    dec.token_buffer[:, 2] = ids[:, 2]
    wrong = dec.score(3)
    torch.testing.assert_close(wrong[:, 0], stepped[1], rtol=0, atol=1e-10)
    assert (wrong[:, 1] - stepped[2]).abs().max() > 1e-3
    dec.rewind(2)                                    # keep positions 0, 1; correct the id at 1
    dec.push(ids[:, 1])
    torch.testing.assert_close(dec.score(2), torch.stack(stepped[2:4], 1), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="only inside the chunk"):
        dec.rewind(1)
    with pytest.raises(ValueError, match="inside one block of 4"):
        dec.score(5)
    with pytest.raises(ValueError, match="count must be an integer >= 1"):
        dec.score(0)


def test_draft_spans_cover_the_range():
    assert span_bounds(3, 10, 3) == [(3, 5), (5, 7), (7, 10)]
    assert span_bounds(0, 2, 5) == [(0, 1), (1, 2)]


# --- bad input ----------------------------------------------------------------------------------
def test_bad_input_is_named():
    teacher, student, _ = _random_pair()
    with pytest.raises(ValueError, match="gamma .* >= 1, got 0"):
        SpeculativeWindowSampler(teacher, student, gamma=0)
    other, _, _ = _random_pair(l_bins=5)
    with pytest.raises(ValueError, match="codebook has 5 codes, the teacher's 4"):
        SpeculativeWindowSampler(teacher, ParallelStudent(other.config))
    longer = PriorConfig(**{**teacher.config.to_dict(), "n_ctx": 16, "blocks": 4})
    with pytest.raises(ValueError, match="n_ctx=16, the teacher's n_ctx=8"):
        SpeculativeWindowSampler(teacher, ParallelStudent(longer))
    with pytest.raises(TypeError, match="ParallelStudent"):
        SpeculativeWindowSampler(teacher, teacher)
    sampler = SpeculativeWindowSampler(teacher, student)
    with pytest.raises(ValueError, match="exceed the window"):
        sampler(torch.zeros(1, 4, dtype=torch.long), 5)
    jb = fastjukebox.load("tiny")
    z_top = torch.zeros(1, jb.prior(2).config.n_ctx, dtype=torch.long)
    with pytest.raises(ValueError, match="no parallel student for level 1"):
        jb.upsample(z_top, sampler="speculative", progress=False)
    with pytest.raises(ValueError, match="the speculative sampler covers the upsamplers"):
        jb.sample(seconds=0.5, sampler={2: "speculative"}, progress=False)


# --- through the API and the CLI ----------------------------------------------------------------
@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The tiny family with students (the teachers' weights) for both upsamplers, saved and loaded back."""
    jb = fastjukebox.load("tiny")
    students = {level: ParallelStudent.from_teacher(jb.prior(level)) for level in (0, 1)}
    path = tmp_path_factory.mktemp("family")
    Jukebox(jb.vqvae, {l: jb.prior(l) for l in jb.levels}, students).save(path)
    return path


def test_api_greedy_equals_ar_over_hopped_windows(family):
    jb = fastjukebox.load(family)
    z_top = torch.randint(0, jb.prior(2).config.l_bins, (3, jb.prior(2).config.n_ctx),
                          generator=torch.Generator().manual_seed(0))
    kw = dict(top_k=1, seed=0, max_batch_size=2, progress=False)
    ar = jb.upsample(z_top, sampler="ar", **kw)
    sp = jb.upsample(z_top, sampler={1: "speculative", 0: "speculative"}, gamma=5, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ar.codes[:2], sp.codes[:2]))


def test_cli_sampler_speculative(family, tmp_path):
    out = tmp_path / "s.wav"
    rc = cli_main(["sample", "--model", str(family), "--seconds", "0.8", "--n-samples", "1", "--seed", "0",
                   "--sampler", "1=speculative,0=speculative", "--gamma", "4", "--quiet", "--out", str(out)])
    assert rc in (0, None)
    assert "codes_level0" in np.load(out.with_suffix(".npz")).files
    with pytest.raises(SystemExit):
        cli_main(["sample", "--model", str(family), "--gamma", "0", "--out", str(out)])


@pytest.mark.parametrize("name,order", [("tiny_upsampler_level_0", None), ("tiny_prior_5b", None),
                                        ("tiny_prior_5b_lyrics", None), ("tiny_prior_1b_lyrics", None),
                                        ("random", (0, 2)), ("random", (9, 4)), ("random", (2, 6))])
def test_chunked_scoring_equals_one_token_steps(name, order):
    """``score`` (``fastjukebox.cached_forward``) gives the logits of one-token steps, every pattern, every
    chunk length inside a block, float64 to 1e-10."""
    if name == "random":
        torch.manual_seed(0)
        prior = Prior(PriorConfig(level=2, n_ctx=48, width=24, depth=order[1], heads=2, attn_order=order[0],
                                  blocks=6, l_bins=32, labels=False)).double().eval()
        for p in prior.parameters():
            p.normal_(0, 0.3)
        z, upper, y = torch.randint(0, 32, (2, 48)), None, None
    else:
        prior = load_prior(DATA / f"{name}.pth.tar", dtype=torch.float64)
        io = np.load(DATA / f"{name}_io.npz")
        z, y = torch.from_numpy(io["z"]), torch.from_numpy(io["y"])
        upper = torch.from_numpy(io["z_cond"]) if "z_cond" in io else None
    c, N = prior.config, z.shape[0]
    dec = WindowDecoder(prior, N)
    dec.begin(upper, y)
    stepped = []
    for t in range(c.n_ctx):
        stepped.append(dec.step())
        dec.push(z[:, t] + (c.n_vocab if c.lyrics == "merged" else 0))
    stepped = torch.stack(stepped, 1)
    dec.begin(upper, y)
    off, C = dec.offset, c.block_len
    pos, lengths = 0, itertools.cycle([1, 3, C, 2, 5])
    while pos < c.n_ctx:
        T = min(next(lengths), C - (pos + off) % C, c.n_ctx - pos)
        dec.token_buffer[:, off + pos:off + pos + T] = z[:, pos:pos + T] + (c.n_vocab if c.lyrics == "merged" else 0)
        got = dec.score(T)
        assert _rel(got, stepped[:, pos:pos + T]) < 1e-10, (pos, T)
        pos += T


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_h100_projection_behaves():
    """One token per call and no draft costs what AR costs; more tokens per call is faster, never
    by more than the tokens per call; every draft pass costs time."""
    from benchmarks.speculative import project_h100
    even = project_h100(tokens_per_call=1.0, student_passes=0)
    assert even["speedup"] == pytest.approx(1.0)
    a, b = project_h100(2.0, 1), project_h100(3.0, 1)
    assert 1.0 < a["speedup"] < 2.0 and a["speedup"] < b["speedup"] < 3.0
    assert project_h100(2.0, 2)["speedup"] < a["speedup"] < project_h100(2.0, 0)["speedup"] == pytest.approx(2.0)
    drafted = project_h100(2.0, 0, drafter_steps=1.0)
    assert 1.0 < drafted["speedup"] < project_h100(2.0, 0)["speedup"]     # every drafted position costs time
    assert drafted["t_draft_ms"] < drafted["t_step_ms"] / 10               # ... far less than a teacher step


def test_the_crossover_is_the_first_batch_from_which_every_level_is_slower():
    """``crossover_batch``: a batch where one level still gains is not the crossover, nor one
    followed by a batch that gains again; no slower batch at all gives None."""
    from benchmarks.speculative import crossover_batch

    def rows(ratios):   # {batch: (level-0 ratio, level-1 ratio)}
        return [dict(batch=b, level=l, ratio=r) for b, pair in ratios.items() for l, r in enumerate(pair)]
    assert crossover_batch(rows({1: (1.7, 1.8), 2: (1.1, 1.2), 3: (0.98, 1.08), 4: (0.9, 0.93), 16: (0.7, 0.8)})) == 4
    assert crossover_batch(rows({1: (1.7, 1.8), 2: (0.95, 0.9), 4: (1.01, 0.9), 8: (0.9, 0.9)})) == 8
    assert crossover_batch(rows({1: (1.7, 1.8), 16: (1.2, 1.1)})) is None
    assert crossover_batch(rows({1: (0.9, 0.8), 2: (0.9, 0.9)})) == 1
