"""Cached decoding equals teacher forcing; the windowed sampler reproduces the original's runs."""
import json

import numpy as np
import pytest
import torch

from fastjukebox import Jukebox, Prior, PriorConfig, VQVAE, load_prior, load_vqvae
from fastjukebox.decoding import WindowDecoder
from fastjukebox.sampling import filter_logits, level_windows, sample_levels, sample_logits

from conftest import DATA



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

FIXTURE_PRIORS = ["tiny_upsampler_level_0", "tiny_upsampler_level_1", "tiny_prior_5b",
                  "tiny_prior_5b_lyrics", "tiny_prior_1b_lyrics"]


def _fixture_prior(name):
    prior = load_prior(DATA / f"{name}.pth.tar", dtype=torch.float64)
    io = np.load(DATA / f"{name}_io.npz")
    upper = torch.from_numpy(io["z_cond"]) if "z_cond" in io else None
    return prior, torch.from_numpy(io["z"]), upper, torch.from_numpy(io["y"])


def _random_prior(attn_order, depth, seed=0, **kw):
    """Small random prior whose layers cover ``attn_order``'s patterns (dense included)."""
    torch.manual_seed(seed)
    cfg = PriorConfig(level=2, n_ctx=48, width=24, depth=depth, heads=2, attn_order=attn_order, blocks=6,
                      l_bins=32, labels=False, **kw)
    prior = Prior(cfg).double().eval()
    for p in prior.parameters():
        p.normal_(0, 0.3)
    z = torch.randint(0, cfg.l_bins, (3, cfg.n_ctx))
    return prior, z, None, None


CASES = ([(n, None) for n in FIXTURE_PRIORS] + [("random", (0, 2)), ("random", (9, 4)), ("random", (2, 6))]
         + [("random_res_scale", (2, 3))])


def _case(name, order):
    if name == "random":
        return _random_prior(*order)
    if name == "random_res_scale":
        return _random_prior(*order, res_scale=True)
    return _fixture_prior(name)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name,order", CASES, ids=lambda v: str(v) if v is not None else "")
@pytest.mark.parametrize("known,chunk", [(0, 1), (13, 5), (24, 32), (31, 7)])
def test_cached_steps_equal_teacher_forcing(name, order, known, chunk):
    prior, z, upper, y = _case(name, order)
    c = prior.config
    full = prior.logits(z, upper, y)
    off = c.n_lyric_prefix
    shift = c.n_vocab if c.lyrics == "merged" else 0
    dec = WindowDecoder(prior, z.shape[0])
    dec.begin(upper, y)
    dec.prime(z[:, :known], chunk_size=chunk)
    worst = 0.0
    for t in range(known, c.n_ctx):
        logits = dec.step()
        worst = max(worst, _rel(logits, full[:, off + t]))
        dec.push(z[:, t] + shift)
    assert worst < 1e-10
    assert torch.equal(dec.codes(), z)


def test_decoder_reused_across_windows_and_smaller_batches():
    prior, z, upper, y = _fixture_prior("tiny_upsampler_level_0")
    dec = WindowDecoder(prior, 2)
    other = torch.roll(z, 3, dims=1)
    for tokens in (other, z):           # a second window after a first one left the cache full
        dec.begin(upper, y)
        dec.prime(tokens[:, :20], chunk_size=6)
        logits = [dec.step()]
        dec.push(tokens[:, 20])
        logits.append(dec.step())
    full = prior.logits(z, upper, y)
    assert _rel(torch.stack(logits, 1), full[:, 20:22]) < 1e-10
    dec.begin(upper[:1], y[:1])          # batch 1 through the same decoder
    dec.prime(z[:1, :9])
    assert _rel(dec.step(), full[:1, 9]) < 1e-10


def test_decoder_follows_a_prior_converted_after_it_was_built():
    prior, z, upper, y = _fixture_prior("tiny_upsampler_level_0")
    full = prior.logits(z, upper, y)
    dec = WindowDecoder(prior, 2)
    prior.float().double()              # replaces every weight's storage (values unchanged)
    dec.begin(upper, y)
    dec.prime(z[:, :9])
    assert _rel(dec.step(), full[:, 9]) < 1e-10
    with torch.no_grad():               # new values in new storage must be read too
        for p in prior.parameters():
            p.data = p.data * 1.01
    dec.begin(upper, y)
    dec.prime(z[:, :9])
    assert _rel(dec.step(), prior.logits(z, upper, y)[:, 9]) < 1e-10
    prior.float()
    with pytest.raises(ValueError, match="build the WindowDecoder after converting"):
        dec.begin(upper, y)


@pytest.mark.parametrize("name", FIXTURE_PRIORS)
def test_greedy_window_matches_original(name):
    prior, z, upper, y = _fixture_prior(name)
    io = np.load(DATA / f"{name}_io.npz")
    dec = WindowDecoder(prior, 2)
    for prefix, key in ((0, "greedy_ancestral"), (int(io["greedy_prefix_len"]), "greedy_primed")):
        dec.begin(upper, y)
        dec.prime(z[:, :prefix], int(io["greedy_chunk_size"]))
        for _ in range(prefix, prior.config.n_ctx):
            dec.push(sample_logits(dec.step(), top_k=1))
        assert np.array_equal(dec.codes().numpy(), io[key])
        if f"{key}_raw" in io:
            assert np.array_equal(dec.tokens().numpy(), io[f"{key}_raw"])


def _tiny_family(dtype=torch.float64):
    vq = load_vqvae(DATA / "tiny_vqvae.pth.tar", dtype=dtype)
    names = {0: "tiny_upsampler_level_0", 1: "tiny_upsampler_level_1", 2: "tiny_prior_5b"}
    return vq, {l: load_prior(DATA / f"{n}.pth.tar", dtype=dtype) for l, n in names.items()}


@pytest.mark.parametrize("fixture", ["pipeline_greedy", "pipeline_primed_greedy"])
def test_pipeline_reproduces_original(fixture):
    vq, priors = _tiny_family()
    meta = json.loads((DATA / f"{fixture}.json").read_text())
    io = np.load(DATA / f"{fixture}.npz")
    labels = {l: torch.from_numpy(io[f"labels_y_level{l}"]) for l in range(3)}
    codes = None
    if "prompt_x" in io:
        codes = vq.encode(torch.from_numpy(io["prompt_x"]))
        for l in range(3):
            assert np.array_equal(codes[l].numpy(), io[f"prompt_codes_level{l}"])
    zs = sample_levels(vq, priors, labels, meta["sample_length"], codes=codes, hop_fraction=meta["hop_fraction"],
                       chunk_size=meta["chunk_size"], temperature=meta["temp"], top_k=meta["top_k"],
                       max_batch_size=meta["max_batch_size"], seed=0, progress=False)
    for l in range(3):
        assert np.array_equal(zs[l].numpy(), io[f"codes_level{l}"]), f"level {l}"
    audio = vq.decode(zs[0], 0)
    ref = io["decoded_level0"][..., 0]
    assert np.abs(audio.numpy() - ref).max() / np.abs(ref).max() < 1e-9


def test_window_walk_matches_original_counts():
    meta = json.loads((DATA / "pipeline_greedy.json").read_text())
    for level, info in meta["windows"].items():
        walk = level_windows(info["total_length"], info["n_ctx"], info["hop_length"], 0)
        assert [(w[0], w[1], w[2]) for w in walk] == [
            (s["start"], s["conditioning_tokens"], s["new_tokens"]) for s in info["sampled"]], level


def test_seeded_sampling_is_reproducible_and_seed_matters():
    vq, priors = _tiny_family(torch.float32)
    labels = torch.tensor([[40960, 0, 0, 3, 1, 4, -1, -1, -1]] * 2)
    run = lambda seed: sample_levels(vq, priors, labels, 2048, levels=(2, 1, 0), seed=seed, progress=False,
                                     max_batch_size=1)
    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_top_k_and_top_p_never_emit_filtered_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0, 2.5]]).repeat(4000, 1)
    ids = sample_logits(logits, temperature=1.0, top_k=3, generator=g)
    assert set(ids.tolist()) == {0, 1, 2}
    # probabilities ~ [.55, .20, .07, .004, .001, .045]: top_p=0.7 keeps {0, 1} (the token that
    # crosses the threshold stays), nothing else
    ids = sample_logits(logits, temperature=1.0, top_p=0.7, generator=g)
    assert set(ids.tolist()) == {0, 1}
    kept = filter_logits(logits[:1], top_p=0.7)
    assert torch.isinf(kept[0, 2:]).all() and torch.isfinite(kept[0, :2]).all()
    ids = sample_logits(logits, temperature=5.0, generator=g)   # unfiltered: every token appears
    assert set(ids.tolist()) == set(range(6))


def test_draws_follow_the_softmax_of_the_tempered_logits():
    """The exponential race with ``-log(U)`` noise is a categorical draw: 200k draws per row land
    within 5 standard errors of softmax(logits / T) for every token."""
    g = torch.Generator().manual_seed(3)
    base = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.25]])
    n, T = 200_000, 0.99
    counts = torch.bincount(sample_logits(base.repeat(n, 1), temperature=T, generator=g), minlength=8).double()
    p = torch.softmax(base[0].double() / T, -1)
    se = (p * (1 - p) / n).sqrt()
    assert ((counts / n - p).abs() / se).max() < 5


def test_exponential_noise_is_positive_and_exp1():
    from kernels.sampling.reference import exponential_noise
    e = exponential_noise((1000, 1000), "cpu", torch.Generator().manual_seed(0)).double()
    assert (e > 0).all()                                  # a zero would let a filtered token win
    assert abs(e.mean().item() - 1) < 0.005 and abs(e.var().item() - 1) < 0.01
    assert abs((e > 2).double().mean().item() - np.exp(-2)) < 0.002


def test_bad_sampling_input_is_named():
    vq, priors = _tiny_family(torch.float32)
    labels = torch.tensor([[40960, 0, 0, 3, 1, 4, -1, -1, -1]])
    with pytest.raises(ValueError, match="too short for the level-1 upsampler"):
        sample_levels(vq, priors, labels, 256, levels=(2, 1, 0), progress=False)
    with pytest.raises(ValueError, match="multiple of 128"):
        sample_levels(vq, priors, labels, 1000, progress=False)
    jb = Jukebox(vq, priors)
    with pytest.raises(ValueError, match="level-2 codes must be in"):
        jb.upsample(torch.full((1, 8), 999), 3, 1, progress=False)
    with pytest.raises(ValueError, match="must list 3 levels"):
        jb.continue_([torch.zeros(1, 4, dtype=torch.long)], 3, 1, seconds=0.1, progress=False)
    with pytest.raises(ValueError, match="already exceed"):
        jb.continue_([None, None, torch.zeros(1, 200, dtype=torch.long)], 3, 1, seconds=0.1, progress=False)
    with pytest.raises(ValueError, match="unknown sampler 'fast'"):
        jb.sample(3, 1, seconds=0.1, sampler={0: "fast"}, progress=False)
    with pytest.raises(ValueError, match="no parallel student for level 0"):
        jb.sample(3, 1, seconds=0.1, sampler={0: "parallel"}, progress=False)
    with pytest.raises(ValueError, match="shorter than one top-level code"):
        jb.sample(3, 1, seconds=0.001, progress=False)


@pytest.mark.parametrize("known_shape, n_new, match", [((2, 10), 48, "exceed the window"), ((2, 10), -1, "n_new"),
                                                         ((0, 4), 3, "N >= 1"), ((10,), 3, r"\(N, K\)")])
def test_a_bad_window_call_is_named_before_any_step(monkeypatch, known_shape, n_new, match):
    from fastjukebox.sampling import ARWindowSampler
    prior = _random_prior(2, 3)[0]
    assert prior.config.n_ctx == 48
    sampler = ARWindowSampler(prior, 2)
    steps = []
    monkeypatch.setattr(sampler.decoder, "step", lambda: steps.append(1))
    monkeypatch.setattr(sampler.decoder, "begin", lambda *a, **k: steps.append(0))
    with pytest.raises(ValueError, match=match):
        sampler(torch.zeros(known_shape, dtype=torch.long), n_new, temperature=1.0)
    assert steps == []


def test_the_race_on_logits_draws_what_the_race_on_probabilities_draws():
    """``race_winner(logits - log E)`` picks ``categorical_draw(softmax(logits), E)``'s ids (the
    first of tied maxima too), and writes them into a strided view without touching the rest of
    its buffer."""
    from kernels.sampling.reference import categorical_draw, race_winner
    g = torch.Generator().manual_seed(21)
    for V in (2, 7, 256):
        logits = torch.randn(500, V, generator=g) * 3
        noise = torch.empty(500, V).exponential_(generator=g)
        want = categorical_draw(torch.softmax(logits, -1), noise=noise)
        assert torch.equal(race_winner(logits - noise.log()), want)
        buffer = torch.full((500, 3), -1, dtype=torch.long)
        assert torch.equal(race_winner(logits - noise.log(), out=buffer[:, 1]), want)
        assert torch.equal(buffer[:, 1], want) and bool((buffer[:, [0, 2]] == -1).all())
    tied = torch.randint(0, 2, (64, 9), generator=g).float()
    assert torch.equal(race_winner(tied), tied.argmax(-1))
    counts = torch.bincount(race_winner(torch.tensor([[0.0, 1.0, 2.0]]).expand(30000, 3)
                                        - torch.empty(30000, 3).exponential_(generator=g).log()), minlength=3)
    torch.testing.assert_close(counts / 30000., torch.softmax(torch.tensor([0.0, 1.0, 2.0]), -1), atol=0.015, rtol=0)
