"""The classifier two-sample test of distill.two_sample."""
import pytest
import torch

from distill.two_sample import classifier_two_sample_test

L_BINS, N_CTX = 32, 64


def _runs(n, g):
    """A structured generator: codes held for runs of 4-12 positions, drawn from the lower half."""
    out = torch.empty(n, N_CTX, dtype=torch.long)
    for i in range(n):
        t = 0
        while t < N_CTX:
            length = int(torch.randint(4, 13, (1,), generator=g))
            out[i, t:t + length] = torch.randint(0, L_BINS // 2, (1,), generator=g)
            t += length
    return out


def test_separates_a_structured_generator_from_uniform_codes():
    g = torch.Generator().manual_seed(0)
    a = _runs(64, g)
    b = torch.randint(0, L_BINS, (64, N_CTX), generator=g)
    r = classifier_two_sample_test(a, b, l_bins=L_BINS, steps=60, seed=1)
    assert r["accuracy"] > 0.9
    assert r["n_test"] == 64 and r["n_train"] == 64


def test_does_not_separate_a_generator_from_itself():
    g = torch.Generator().manual_seed(2)
    accs = [classifier_two_sample_test(_runs(64, g), _runs(64, g), l_bins=L_BINS, steps=60, seed=s)
            for s in range(3)]
    mean = sum(r["accuracy"] for r in accs) / len(accs)
    se = (0.25 / (3 * accs[0]["n_test"])) ** 0.5
    assert abs(mean - 0.5) < 3 * se, [r["accuracy"] for r in accs]


def test_conditioning_mismatch_is_detected():
    """Windows that copy their upper codes vs windows that copy another row's upper codes."""
    g = torch.Generator().manual_seed(3)
    upper = torch.randint(0, L_BINS, (64, N_CTX // 4), generator=g)
    a = upper.repeat_interleave(4, dim=1)
    b = upper.roll(1, dims=0).repeat_interleave(4, dim=1)
    without = classifier_two_sample_test(a, b, l_bins=L_BINS, steps=60, seed=0)
    with_upper = classifier_two_sample_test(a, b, l_bins=L_BINS, upper=upper, upper_bins=L_BINS, steps=60, seed=0)
    assert with_upper["accuracy"] > 0.8
    assert without["accuracy"] < 0.7


def test_bad_input_is_named():
    a = torch.zeros(8, N_CTX, dtype=torch.long)
    with pytest.raises(ValueError, match="both be"):
        classifier_two_sample_test(a, a[:, :32], l_bins=L_BINS)
    with pytest.raises(ValueError, match="at least 4 windows"):
        classifier_two_sample_test(a[:3], a[:3], l_bins=L_BINS)
    with pytest.raises(ValueError, match=r"integer codes in \[0, 32\)"):
        classifier_two_sample_test(a, a + 40, l_bins=L_BINS)
