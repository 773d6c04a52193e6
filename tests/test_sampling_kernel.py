"""Fused Triton sampling picks exactly the reference's token for the same Exp(1) noise.

Without CUDA the kernel runs in Triton's interpreter on the CPU; with CUDA natively.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from fastjukebox.sampling import filter_logits as fj_filter_logits
from fastjukebox.sampling import sample_logits as fj_sample_logits
from kernels.sampling.ops import MAX_VOCAB, sample_logits, supports
from kernels.sampling.reference import filter_logits, sample_logits_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def noise_like(gen, n, v):
    return torch.empty(n, v).exponential_(1.0, generator=gen).to(DEVICE)


def allowed(logits, temperature, top_k, top_p):
    """(N, V) bool: tokens the reference's filter keeps."""
    return torch.isfinite(filter_logits(logits.float() / temperature, top_k, top_p))


SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 0.0), (0.7, 0, 0.0), (0.99, 1, 0.0), (1.3, 7, 0.0), (0.9, 0, 0.5), (0.8, 50, 0.95),
    (1.0, 0, 1e-6), (2.5, 0, 1.0), (1.0, 10 ** 6, 0.0), (0.05, 0, 0.9),
]


@pytest.mark.parametrize("V", [37, 2128])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "t{}-k{}-p{}".format(*s))
def test_same_token_as_reference(setting, V, gen):
    t, k, p = setting
    N = 10
    logits = (torch.randn(N, V, generator=gen) * 3).to(DEVICE)
    noise = noise_like(gen, N, V)
    ref = sample_logits_reference(logits, t, k, p, noise=noise)
    tri = sample_logits(logits, t, k, p, noise=noise)
    assert tri.dtype == torch.long and tri.shape == (N,)
    assert torch.equal(tri, ref)
    assert allowed(logits, t, k, p).gather(1, tri[:, None]).all()


def test_reference_is_the_samplers_filter(gen):
    logits = torch.randn(7, 333, generator=gen) * 2
    logits[0, :3] = logits[0, 3]          # ties at the top
    for k, p in ((0, 0.0), (1, 0.0), (9, 0.0), (0, 0.3), (0, 0.97), (25, 0.8), (400, 1.0)):
        assert torch.equal(filter_logits(logits, k, p), fj_filter_logits(logits, k, p))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_logits(dtype, gen):
    N, V = 16, 300
    logits = (torch.randn(N, V, generator=gen) * 2).to(device=DEVICE, dtype=dtype)
    noise = noise_like(gen, N, V)
    for t, k, p in ((0.9, 0, 0.0), (1.1, 12, 0.8)):
        assert torch.equal(sample_logits(logits, t, k, p, noise=noise),
                           sample_logits_reference(logits, t, k, p, noise=noise))


def test_generator_draws_the_samplers_noise():
    """With a generator (no noise given), the kernel draws fastjukebox.sampling's exact noise,
    so it returns the sampler's tokens; the reference wrapper does too."""
    logits = (torch.randn(9, 513, generator=torch.Generator().manual_seed(5)) * 2).to(DEVICE)
    for t, k, p in ((0.99, 0, 0.0), (0.8, 20, 0.9)):
        want = fj_sample_logits(logits, t, k, p, generator=torch.Generator(DEVICE).manual_seed(77))
        got = sample_logits(logits, t, k, p, generator=torch.Generator(DEVICE).manual_seed(77))
        ref = sample_logits_reference(logits, t, k, p, generator=torch.Generator(DEVICE).manual_seed(77))
        assert torch.equal(got, want) and torch.equal(ref, want)
    a = sample_logits(logits, generator=torch.Generator(DEVICE).manual_seed(1))
    b = sample_logits(logits, generator=torch.Generator(DEVICE).manual_seed(2))
    assert not torch.equal(a, b)           # the noise really comes from the generator


def test_crafted_ties_and_masks(gen):
    """Tied k-th logits are all kept (the reference keeps ``x >= kth``); -inf logits, tokens past
    the top-p mass and tokens below the k-th are never drawn, whatever the noise."""
    n = 40
    row = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0, float("-inf"), 0.0, -2.0])
    logits = row.repeat(n, 1).to(DEVICE)
    noise = noise_like(gen, n, row.numel())
    tok = sample_logits(logits, 1.0, 2, 0.0, noise=noise)
    assert torch.equal(tok, sample_logits_reference(logits, 1.0, 2, 0.0, noise=noise))
    assert set(tok.tolist()) <= {0, 1, 2, 3} and len(set(tok.tolist())) > 1
    tok = sample_logits(logits, 3.0, 0, 0.0, noise=noise)
    assert 5 not in tok.tolist()
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.6 keeps the first token past the threshold
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log().repeat(n, 1).to(DEVICE)
    noise = noise_like(gen, n, 4)
    for p, keep in ((0.6, {1, 3}), (0.85, {0, 1, 3})):
        tok = sample_logits(logits, 1.0, 0, p, noise=noise)
        assert torch.equal(tok, sample_logits_reference(logits, 1.0, 0, p, noise=noise))
        assert set(tok.tolist()) == keep, p


def test_filtered_tokens_never_emitted(gen):
    N, V = 40, 61
    logits = torch.randn(N, V, generator=gen).to(DEVICE)
    for t, k, p in ((1.0, 5, 0.0), (1.2, 9, 0.7)):
        tok = sample_logits(logits, t, k, p, generator=gen if DEVICE == "cpu" else None)
        assert allowed(logits, t, k, p).gather(1, tok[:, None]).all()


def test_strided_rows_and_empty_batch(gen):
    base = torch.randn(6, 140, generator=gen).to(DEVICE)
    logits = base[:, 7:107]                 # row stride 140, vocab 100
    noise = noise_like(gen, 6, 100)
    assert torch.equal(sample_logits(logits, 0.9, 3, 0.0, noise=noise),
                       sample_logits_reference(logits, 0.9, 3, 0.0, noise=noise))
    assert sample_logits(torch.zeros(0, 10, device=DEVICE), noise=torch.zeros(0, 10, device=DEVICE)).shape == (0,)


def test_bad_inputs_are_named():
    logits = torch.randn(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        sample_logits(logits[None])
    with pytest.raises(ValueError, match="vocabulary size"):
        sample_logits(torch.randn(1, MAX_VOCAB + 1, device=DEVICE))
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(logits, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        sample_logits(logits, top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        sample_logits(logits, top_p=1.5)
    with pytest.raises(ValueError, match="noise must be"):
        sample_logits(logits, noise=torch.ones(2, 9, device=DEVICE))
    with pytest.raises(ValueError, match="noise must be"):
        sample_logits(logits, noise=torch.ones(2, 10, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        sample_logits(logits.double())


def test_supports():
    assert not supports(torch.randn(2, 10))                # CPU: the torch sampler
    if DEVICE == "cuda":
        assert supports(torch.randn(2, 2048, device="cuda"))
        assert not supports(torch.randn(2, MAX_VOCAB + 1, device="cuda"))
