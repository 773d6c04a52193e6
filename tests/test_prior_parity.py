"""Teacher-forced parity of the priors with the original (tiny fixtures)."""
from __future__ import annotations

import pytest
import torch

from conftest import PRIOR_FIXTURES, io, load_prior, prior_inputs, rel_err

TOP = ("tiny_prior_5b", "tiny_prior_5b_lyrics", "tiny_prior_1b_lyrics")
N_LYRIC_PREFIX = {"tiny_prior_1b_lyrics": 16}


def _prefix(name: str) -> int:
    return N_LYRIC_PREFIX.get(name, 0)


@pytest.fixture(scope="module")
def full_logits():
    """float64 logits of every fixture's full window, computed once."""
    out = {}
    for name in PRIOR_FIXTURES:
        z, zc, y = prior_inputs(name)
        with torch.no_grad():
            out[name] = load_prior(name, torch.float64).logits(z, zc, y)
    return out


@pytest.mark.parametrize("name", PRIOR_FIXTURES)
def test_logits_float64(name, full_logits):
    got, ref = full_logits[name], io(name)["logits"]
    assert got.dtype == torch.float64
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-9


@pytest.mark.parametrize("name", PRIOR_FIXTURES)
def test_logits_float32(name):
    z, zc, y = prior_inputs(name)
    prior = load_prior(name, torch.float32)
    with torch.no_grad():
        got = prior.logits(z, zc, y)
    assert got.dtype == torch.float32
    assert rel_err(got, io(name)["logits"]) <= 1e-4


@pytest.mark.parametrize("name", PRIOR_FIXTURES)
def test_loss_float64(name):
    z, zc, y = prior_inputs(name)
    fx = io(name)
    with torch.no_grad():
        losses = load_prior(name, torch.float64).loss(z, zc, y)
    assert set(losses) == {"loss", "gen_loss", "prime_loss"}
    for key in ("loss", "gen_loss", "prime_loss"):
        got, ref = losses[key].item(), fx[key].item()
        assert abs(got - ref) <= 1e-9 * max(1.0, abs(ref)), f"{key}: {got!r} vs {ref!r}"
    if name in ("tiny_prior_5b_lyrics", "tiny_prior_1b_lyrics"):
        assert fx["prime_loss"].item() > 0  # the weighting of both terms is exercised
    else:
        assert losses["prime_loss"].item() == 0.0


@pytest.mark.parametrize("name", PRIOR_FIXTURES)
def test_condition_matches_original(name):
    z, zc, y = prior_inputs(name)
    fx = io(name)
    prior = load_prior(name, torch.float64)
    with torch.no_grad():
        cond = prior.condition(zc, y)
    p = _prefix(name)
    assert cond.x_cond.shape == (2, p + 64, 32)
    if p:
        # merged lyrics: the lyric positions carry no conditioning
        assert torch.equal(cond.x_cond[:, :p], torch.zeros_like(cond.x_cond[:, :p]))
        assert torch.equal(cond.lyric_tokens, y[:, -p:])
    assert rel_err(cond.x_cond[:, p:], fx["x_cond"]) <= 1e-9
    assert cond.start.shape == (2, 1, 32)
    assert rel_err(cond.start, fx["y_cond"]) <= 1e-9
    if name == "tiny_prior_5b_lyrics":
        assert rel_err(cond.encoder_kv, fx["encoder_kv"]) <= 1e-9
        assert torch.equal(cond.lyric_tokens, y[:, -16:])
    else:
        assert cond.encoder_kv is None


def test_prime_logits_5b_lyrics():
    _, _, y = prior_inputs("tiny_prior_5b_lyrics")
    with torch.no_grad():
        got = load_prior("tiny_prior_5b_lyrics", torch.float64).prime_logits(y)
    assert got.shape == (2, 16, 80)
    assert rel_err(got, io("tiny_prior_5b_lyrics")["prime_logits"]) <= 1e-9


@pytest.mark.parametrize("name", ["tiny_prior_5b", "tiny_prior_1b_lyrics", "tiny_upsampler_level_0"])
def test_prime_logits_only_with_encoder(name):
    z, zc, y = prior_inputs(name)
    with pytest.raises(ValueError, match=r"lyric encoder"):
        load_prior(name, torch.float64).prime_logits(y)


@pytest.mark.parametrize("name", TOP)
def test_time_bins(name):
    _, _, y = prior_inputs(name)
    fx = io(name)
    total, absolute, relative = load_prior(name, torch.float64).y_emb.time_bins(y)
    assert torch.equal(total, fx["time_bins_total"])
    assert torch.equal(absolute, fx["time_bins_absolute"])
    assert torch.equal(relative, fx["time_bins_relative"])


@pytest.mark.parametrize("name", PRIOR_FIXTURES)
@pytest.mark.parametrize("T", [1, 9, 37])
def test_prefix_logits_are_causal(name, T, full_logits):
    """Logits of the first T tokens equal the first rows of the full window's logits."""
    z, zc, y = prior_inputs(name)
    with torch.no_grad():
        got = load_prior(name, torch.float64).logits(z[:, :T], zc, y)
    p = _prefix(name)
    full = full_logits[name]
    assert got.shape == (2, p + T, full.shape[-1])
    assert rel_err(got, full[:, : p + T]) <= 1e-12


@pytest.mark.parametrize("name", PRIOR_FIXTURES)
def test_changing_a_token_changes_only_later_logits(name, full_logits):
    z, zc, y = prior_inputs(name)
    t = 29
    z2 = z.clone()
    z2[:, t] = (z2[:, t] + 1) % 64
    with torch.no_grad():
        got = load_prior(name, torch.float64).logits(z2, zc, y)
    full, p = full_logits[name], _prefix(name)
    assert rel_err(got[:, : p + t + 1], full[:, : p + t + 1]) <= 1e-12
    # the changed token is the input at position t + 1
    assert (got[:, p + t + 1] - full[:, p + t + 1]).abs().max().item() > 1e-6


def test_merged_layout():
    """1b-style priors: lyric positions first, then music, over the merged vocabulary."""
    prior = load_prior("tiny_prior_1b_lyrics", torch.float64)
    c = prior.config
    assert (c.lyrics, c.n_tokens, c.n_vocab, c.l_bins) == ("merged", 16, 79, 64)
    assert c.prime_len == 24
    z, _, y = prior_inputs("tiny_prior_1b_lyrics")
    for T in (5, 64):
        with torch.no_grad():
            out = prior.logits(z[:, :T], None, y)
        assert out.shape == (2, c.n_tokens + T, c.n_vocab + c.l_bins)


def test_upsampler_config_from_checkpoint():
    c0 = load_prior("tiny_upsampler_level_0", torch.float64).config
    c1 = load_prior("tiny_upsampler_level_1", torch.float64).config
    assert (c0.level, c1.level) == (0, 1)
    assert c0.cond_downsample == c1.cond_downsample == 4
    assert (c0.raw_to_tokens, c1.raw_to_tokens) == (8, 32)
    assert load_prior("tiny_upsampler_level_0", torch.float64).prior.tied
    assert not load_prior("tiny_prior_5b", torch.float64).prior.tied
