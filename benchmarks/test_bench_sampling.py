"""Sampling speed of the static-cache decoder against two baselines (see ``benchmarks.methods``).

``pytest benchmarks --benchmark-only`` times the three methods at batch 1 and 16 on the quick
case (``benchmarks.cases.QUICK_CASE``); ``pytest benchmarks`` also runs the equivalence tests,
which check that the three methods sample identical tokens. ``python -m
benchmarks.sampling_speed`` makes the same comparison in one process and writes a report.
"""
from __future__ import annotations

import pytest
import torch

from .cases import CASES, QUICK_CASE, build_prior, window_inputs
from .methods import METHODS, make_runner, mismatches, sample_all

BENCH = CASES[QUICK_CASE]
CHECK = CASES["upsampler_small_check"]
# (rounds, warm-up rounds): full recompute at batch 16 takes seconds per window.
ROUNDS = {"ours": (3, 1), "growing_cache": (3, 1), "full_recompute": (2, 1)}


@pytest.fixture(scope="module")
def prior32():
    return build_prior(BENCH)


@pytest.mark.parametrize("batch", BENCH.batches)
@pytest.mark.parametrize("method", METHODS)
def test_sampling_speed(benchmark, prior32, method, batch):
    run = make_runner(method, prior32, BENCH, batch)
    rounds, warmup = ROUNDS[method]
    benchmark.group = f"sample {BENCH.n_new} tokens, batch {batch}"
    benchmark.extra_info.update(BENCH.describe())
    benchmark.extra_info.update(method=method, batch=batch, tokens=batch * BENCH.n_new,
                                threads=torch.get_num_threads())
    codes = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert codes.shape == (batch, BENCH.n_new)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median:
        benchmark.extra_info["tokens_per_s"] = batch * BENCH.n_new / stats.median


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("batch", CHECK.batches)
def test_greedy_tokens_identical(dtype, batch):
    """Greedy decoding (top_k=1) gives the same tokens from all three methods, across two block
    boundaries (block, previous-block and transpose caches all change there)."""
    prior = build_prior(CHECK, dtype)
    codes = sample_all(prior, CHECK, batch, temperature=1.0, top_k=1)
    assert codes["ours"].shape == (batch, CHECK.n_new)
    assert mismatches(codes) == {"full_recompute": 0, "growing_cache": 0}
    # The check is only worth something if the tokens depend on the context.
    assert len(set(codes["ours"].flatten().tolist())) > 3


def test_sampled_tokens_identical_fp64():
    """With the same generator, ancestral sampling (temperature 0.99) also agrees token for token
    (in float64 the logits agree far below any gap the draw could fall into)."""
    prior = build_prior(CHECK, torch.float64)
    codes = sample_all(prior, CHECK, 2)
    assert mismatches(codes) == {"full_recompute": 0, "growing_cache": 0}


def test_inputs_are_per_sample():
    """Samples of a batch get different conditioning (so a batch is not one sample repeated)."""
    upper, labels = window_inputs(CHECK, 4)
    assert len({tuple(r) for r in upper.tolist()}) == 4
    assert labels.shape == (4, CHECK.config.label_len)
