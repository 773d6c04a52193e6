"""Temperature 0 is greedy: the teacher's argmax (after top-k / top-p) through every exact sampler."""
from __future__ import annotations

import pytest
import torch

import fastjukebox as fj
from fastjukebox.decoding import WindowDecoder
from fastjukebox.samplers import SAMPLERS
from fastjukebox.sampling import sample_logits


class ArgmaxWindowSampler:
    """The reference: the prior's logits at every position, the largest taken; no sampling code."""

    def __init__(self, prior):
        self.prior = prior

    def __call__(self, known, n_new, upper=None, labels=None, *, chunk_size=32, on_progress=None, **_):
        dec = WindowDecoder(self.prior, known.shape[0])
        dec.begin(upper, labels, n=known.shape[0])
        dec.prime(known, chunk_size)
        for _ in range(n_new):
            dec.push(dec.step().argmax(dim=-1))
        if on_progress is not None:
            on_progress(n_new)
        return dec.codes()


@pytest.fixture(scope="module")
def demo_run():
    """The demo family, 0.75 s of top-level codes and the argmax upsampling of them."""
    jb = fj.load("demo")
    top = torch.randint(0, jb.vqvae.config.l_bins, (1, 260), generator=torch.Generator().manual_seed(0))
    SAMPLERS["argmax-reference"] = lambda jb, level, **_: ArgmaxWindowSampler(jb.prior(level))
    try:
        reference = jb.upsample(top, sampler="argmax-reference", seed=0, progress=False).codes
    finally:
        del SAMPLERS["argmax-reference"]
    return jb, top, reference


@pytest.mark.parametrize("sampler", ["ar", "ar-graph", "speculative"])
def test_temperature_zero_is_the_teachers_argmax(demo_run, sampler):
    jb, top, reference = demo_run
    result = jb.upsample(top, sampler=sampler, temperature=0.0, seed=1, progress=False)
    for level in (1, 0):
        torch.testing.assert_close(result.codes[level], reference[level], rtol=0, atol=0)
    assert result.settings["temperature"] == 0.0
    assert result.settings["sampler"] == {1: sampler, 0: sampler}


def test_temperature_zero_applies_after_top_k_and_top_p():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    want = logits.argmax(dim=-1)
    for top_k, top_p in ((0, 0.0), (5, 0.0), (0, 0.3), (1, 0.9)):
        gen = torch.Generator().manual_seed(1)
        torch.testing.assert_close(sample_logits(logits, 0.0, top_k, top_p, gen), want, rtol=0, atol=0)
    assert not torch.equal(sample_logits(logits, 1.0, 0, 0.0, torch.Generator().manual_seed(1)), want)


def test_cli_accepts_temperature_zero(tmp_path, capsys):
    import numpy as np

    from fastjukebox.cli import main
    for seed in (1, 2):
        assert main(["sample", "--model", "tiny", "--seconds", "0.1", "--levels", "2", "-q", "--temperature", "0",
                     "--seed", str(seed), "--out", str(tmp_path / f"g{seed}.wav")]) == 0, capsys.readouterr().err
    codes = [np.load(tmp_path / f"g{seed}.npz")["codes_level2"] for seed in (1, 2)]
    np.testing.assert_array_equal(codes[0], codes[1])          # greedy: the seed does not matter
    jb = fj.load("tiny")
    SAMPLERS["argmax-reference"] = lambda jb, level, **_: ArgmaxWindowSampler(jb.prior(level))
    try:
        want = jb.sample(seconds=0.1, levels=(2,), sampler="argmax-reference", progress=False).codes[2]
    finally:
        del SAMPLERS["argmax-reference"]
    np.testing.assert_array_equal(codes[0], want.numpy())
