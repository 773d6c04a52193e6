"""The prefix-source diagnosis (benchmarks.prefix_source): the shadow sampler keeps the teacher's
chain and scores the student's fill from the same prefix; the summary's ratios."""
import pytest
import torch

import fastjukebox as fj
from benchmarks.prefix_source import TeacherPrefixed, summarise
from distill.metrics import teacher_token_scores
from fastjukebox.generate import make_labels
from fastjukebox.labels import window_labels
from fastjukebox.sampling import ARWindowSampler


def test_the_chain_is_the_teachers_and_both_fills_are_scored_after_the_same_prefix():
    tiny = fj.load("tiny")
    prior = tiny.prior(0)
    c = prior.config
    g = torch.Generator().manual_seed(0)
    known = torch.randint(0, c.l_bins, (2, 24), generator=g)
    upper = torch.randint(0, c.l_bins, (2, c.n_ctx // c.cond_downsample), generator=g)
    lab = make_labels(tiny, artist=0, genre=0, lyrics="", n_samples=2, total_length=10 * 44100)[0]
    y = window_labels(lab, 0, c.raw_to_tokens, c.sample_length)

    def constant_fill(known, n_new, upper=None, labels=None, **_):
        return torch.cat([known, torch.full((known.shape[0], n_new), 3, dtype=torch.long)], dim=1)

    shadow = TeacherPrefixed(prior, ARWindowSampler(prior, 2), constant_fill)
    done = []
    out = shadow(known, c.n_ctx - 24, upper, y, temperature=1.0, top_k=0, top_p=0.0,
                 generator=torch.Generator().manual_seed(1), on_progress=done.append)
    assert torch.equal(out[:, :24], known) and not (out[:, 24:] == 3).all()    # the teacher's window
    assert done == [c.n_ctx - 24]
    (w,) = shadow.windows
    want_ar = teacher_token_scores(prior, out, upper, y, start=24)[0].mean(dim=1)
    want_fill = teacher_token_scores(prior, constant_fill(known, c.n_ctx - 24), upper, y,
                                     start=24)[0].mean(dim=1)
    assert w["known"] == 24
    torch.testing.assert_close(torch.tensor(w["ar"], dtype=torch.float64), want_ar)
    torch.testing.assert_close(torch.tensor(w["teacher_prefix"], dtype=torch.float64), want_fill)


def test_summary_splits_first_and_hopped_windows():
    windows = [dict(known=0, ar=[2.0], teacher_prefix=[2.0], chained=[3.0]),
               dict(known=8, ar=[2.0, 4.0], teacher_prefix=[2.2, 4.4], chained=[2.0, 4.0])]
    s = summarise(windows)
    assert s["first"]["windows"] == 1 and s["hopped"]["windows"] == 1 and s["all"]["windows"] == 2
    assert s["hopped"]["teacher_prefix_ratio"] == pytest.approx(6.6 / 6.0)
    assert s["hopped"]["chained_ratio"] == pytest.approx(1.0) and s["hopped"]["chained_ratio_se"] == 0.0
    assert s["first"]["chained_ratio"] == pytest.approx(1.5)
    # all: per-sample ratios 1.0, 1.1, 1.1 (teacher prefix): mean 1.0667, se = sd / sqrt(3)
    # deviations -1/15, 1/30, 1/30; sample variance over 2 degrees of freedom; se = sqrt(var / 3)
    assert s["all"]["teacher_prefix_ratio_se"] == pytest.approx((((1 / 15) ** 2 + 2 * (1 / 30) ** 2) / 2 / 3) ** 0.5)
