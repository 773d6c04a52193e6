"""The end-to-end upsample benchmark's measures (benchmarks.upsample): the teacher NLL of a
sampled level over the windows the sampler walked, and the per-sampler summary."""
import copy
import math

import pytest
import torch

import fastjukebox as fj
from benchmarks.upsample import level_teacher_nll, summarise
from fastjukebox.generate import make_labels


@pytest.fixture(scope="module")
def tiny():
    return fj.load("tiny")


def _level0(tiny, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = tiny.prior(0).config
    codes = torch.randint(0, c.l_bins, (2, T), generator=g)
    upper = torch.randint(0, c.l_bins, (2, T // c.cond_downsample), generator=g)
    labels = make_labels(tiny, artist=0, genre=0, lyrics="", n_samples=2, total_length=10 * 44100)[0]
    return codes, upper, labels


def test_a_teacher_without_opinions_costs_log2_of_the_codebook_per_code(tiny):
    """A teacher whose logits are all zero (its tied output rows zeroed) gives every code
    probability 1 / l_bins: log2(l_bins) bits, at every code of the level, each scored once
    (windows of 64 hopping 16 over 136 codes: 5 windows, the later ones 16 new codes each)."""
    prior = copy.deepcopy(tiny.prior(0))
    with torch.no_grad():
        prior.prior.x_emb.weight.zero_()
    c = prior.config
    codes, upper, labels = _level0(tiny, 136)
    nll = level_teacher_nll(prior, codes, upper, labels, hop=16)
    assert nll.shape == (2, 136) and not nll.isnan().any()
    torch.testing.assert_close(nll, torch.full_like(nll, math.log2(c.l_bins)))


def test_each_code_is_scored_in_the_window_that_sampled_it(tiny):
    """Codes after the first window are scored with the context their window had: changing a
    code of the first window's first half (outside every later window of hop 32) moves no score
    from position 64 on (scored in windows [32, 96) and [64, 128)), and no score before it
    (teacher-forced, left to right)."""
    prior = tiny.prior(0)
    codes, upper, labels = _level0(tiny, 128, seed=1)
    base = level_teacher_nll(prior, codes, upper, labels, hop=32)
    assert not base.isnan().any()
    early = codes.clone()
    early[:, 10] = (early[:, 10] + 1) % prior.config.l_bins
    moved = level_teacher_nll(prior, early, upper, labels, hop=32)
    assert not torch.equal(moved[:, 11:64], base[:, 11:64])          # inside its window: context changed
    torch.testing.assert_close(moved[:, :10], base[:, :10])            # before it: untouched
    torch.testing.assert_close(moved[:, 64:], base[:, 64:])            # windows [32, 96) and on: not seen


def test_summary_ratios_are_to_ar_of_the_same_excerpt_and_batch():
    def row(sampler, batch, s1, s0, n1, n0):
        return dict(excerpt="x", sampler=sampler, batch=batch, wall_s=s1 + s0 + 1.0, sampling_s=s1 + s0,
                    level1_s=s1, level0_s=s0, level1_nll=n1, level0_nll=n0, score_agreement=0.8,
                    level1_as_ar=sampler.startswith("1=ar") or sampler == "ar")
    rows = [row("ar", 1, 2.0, 8.0, 4.0, 3.0), row("parallel", 1, 1.0, 4.0, 4.4, 3.3),
            row("ar", 16, 4.0, 16.0, 4.0, 3.0), row("parallel", 16, 2.0, 18.0, 4.0, 2.7)]
    by = {(s["sampler"], s["batch"]): s for s in summarise(rows)}
    assert by["parallel", 1]["speedup"] == pytest.approx(2.0)
    assert by["parallel", 16]["speedup"] == pytest.approx(1.0)
    assert by["parallel", 1]["level1_nll_ratio"] == pytest.approx(1.1)
    assert by["parallel", 16]["level0_nll_ratio"] == pytest.approx(0.9)
    assert by["ar", 16]["speedup"] == pytest.approx(1.0)


def test_an_upsample_reports_each_levels_sampling_time(tiny):
    c = tiny.prior(1).config
    top = torch.randint(0, c.l_bins, (1, 2 * c.n_ctx // c.cond_downsample), generator=torch.Generator().manual_seed(0))
    result = tiny.upsample(top, seed=0, progress=False)
    assert set(result.level_seconds) == {1, 0}
    assert all(s > 0 for s in result.level_seconds.values())
    # the label rows the run started from, for the levels whose prior has labels
    assert set(result.labels) == {l for l in tiny.levels if tiny.prior(l).config.labels}
    assert all(lab.y.shape[0] == 1 for lab in result.labels.values())


def test_the_command_writes_a_table_per_sampler(tmp_path):
    """``python -m benchmarks upsample --quick`` on 1 s of the excerpt: ar and parallel rows with
    their level times, NLLs and ratios to ar, in JSON and markdown."""
    import json
    from benchmarks.upsample import main
    assert main(["--quick", "--seconds", "1", "--out-dir", str(tmp_path), "--name", "t"]) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    by = {s["sampler"]: s for s in data["summary"]}
    assert set(by) == {"ar", "parallel"}
    for s in by.values():
        assert s["level1_s"] > 0 and s["level0_s"] > 0 and 0 < s["level0_nll"] < 8 and 0 < s["level1_nll"] < 8
    assert by["ar"]["speedup"] == 1.0 and by["parallel"]["level0_nll_ratio"] > 0
    assert "| strings | 1 | `parallel` |" in (tmp_path / "t.md").read_text()


def test_a_sampler_entry_may_carry_an_option_and_a_bad_one_is_named(tmp_path):
    """``speculative@disable_at_batch=99`` reaches the sampler: at batch 2 with the option 2 the
    window is decoded token by token (the codes ``"ar"`` draws with the same seeds), with 99 it is
    drafted (other codes, the same distribution)."""
    import json
    from benchmarks.upsample import main, sampler_entry
    assert sampler_entry("speculative") == ("speculative", {})
    assert sampler_entry("1=ar,0=speculative@gamma=4") == ("1=ar,0=speculative", {"gamma": 4})
    for bad in ("speculative@gamma", "speculative@=4", "speculative@gamma=x"):
        with pytest.raises(ValueError, match="write NAME@OPTION=INTEGER"):
            sampler_entry(bad)
    assert main(["--seconds", "1", "--batch", "2", "--samplers", "ar", "speculative@disable_at_batch=2",
                 "speculative@disable_at_batch=99", "--out-dir", str(tmp_path), "--name", "t"]) == 0
    by = {s["sampler"]: s for s in json.loads((tmp_path / "t.json").read_text())["summary"]}
    assert by["speculative@disable_at_batch=2"]["level1_nll"] == by["ar"]["level1_nll"]
    assert by["speculative@disable_at_batch=99"]["level1_nll"] != by["ar"]["level1_nll"]
    assert main(["--samplers", "speculative@gamma", "--out-dir", str(tmp_path)]) == 2
