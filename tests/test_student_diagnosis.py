"""The student diagnosis (``benchmarks.student_diagnosis``): which pass decided each code, and the
per-token teacher scores it reads (``distill.metrics.teacher_token_scores``)."""
import math

import pytest
import torch

from benchmarks.student_diagnosis import _per_pass, _student_run, decided_pass
from distill.metrics import teacher_scores, teacher_token_scores
from distill.sampler import ParallelWindowSampler
from distill.schedules import masks_per_pass, spread_order
from distill.student import ParallelStudent
from fastjukebox import PriorConfig


class _FixedTeacher:
    """A stand-in teacher whose logits are given: ``prior.logits`` returns them whatever the codes."""

    device = torch.device("cpu")

    def __init__(self, logits: torch.Tensor):
        self._logits = logits

    def logits(self, z, upper, labels):
        return self._logits[: z.shape[0]]


def test_teacher_token_scores_on_a_hand_computed_window():
    """Window of 4 positions over 4 codes. Position 2: uniform logits, so NLL and entropy are
    both 2 bits. Position 3: probabilities (1/2, 1/4, 1/8, 1/8) and code 1 drawn: NLL 2 bits,
    entropy 1.75 bits. Positions before ``start`` = 2 are left out."""
    logits = torch.zeros(1, 4, 4)
    logits[0, 0] = torch.tensor([5.0, 0, 0, 0])           # scored only without ``start``
    logits[0, 3] = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    codes = torch.tensor([[0, 3, 2, 1]])
    teacher = _FixedTeacher(logits)
    nll, ent = teacher_token_scores(teacher, codes, torch.zeros(1, 1), None, start=2)
    assert nll.shape == (1, 2) and nll.dtype == torch.float64
    assert nll[0].tolist() == pytest.approx([2.0, 2.0])
    assert ent[0].tolist() == pytest.approx([2.0, 1.75])
    mean_nll, mean_ent = teacher_scores(teacher, codes, torch.zeros(1, 1), None, start=2)
    assert (mean_nll, mean_ent) == pytest.approx((2.0, 1.875))
    # position 0: p(code 0) = e^5 / (e^5 + 3)
    nll0, _ = teacher_token_scores(teacher, codes, torch.zeros(1, 1), None)
    assert float(nll0[0, 0]) == pytest.approx(-math.log2(math.exp(5) / (math.exp(5) + 3)))


def _student():
    c = PriorConfig(level=0, n_ctx=40, width=32, depth=2, heads=2, attn_order=2, blocks=5, l_bins=27,
                    y_bins=(6, 9), max_bow_genre_size=2, cond_width=8, cond_depth=1, cond_dilation_cycle=None,
                    labels=False)
    torch.manual_seed(0)
    return ParallelStudent(c).eval()


@pytest.mark.parametrize("order", ["confidence", "spread", "random"])
def test_decided_pass_follows_the_mask_schedule(order):
    student = _student()
    c = student.config
    g = torch.Generator().manual_seed(3)
    K, n_new, passes = 11, 29, 4
    upper = torch.randint(0, c.l_bins, (5, c.n_ctx // c.cond_downsample), generator=g)
    prefix = torch.randint(0, c.l_bins, (5, K), generator=g)
    sampler = ParallelWindowSampler(student, passes=passes, order=order, confidence_noise=1.0)
    codes, decided = _student_run(student, sampler, prefix, n_new, upper, None, temperature=1.0, batch_size=2,
                                  generator=torch.Generator().manual_seed(4))
    assert codes.shape == (5, K + n_new) and torch.equal(codes[:, :K], prefix)
    assert decided.shape == (5, n_new) and student.logits_unchecked.__func__ is ParallelStudent.logits_unchecked
    sizes = [n_new - still for still in masks_per_pass(n_new, passes)]
    per_pass = [b - a for a, b in zip([0] + sizes, sizes)]
    for row in decided:
        assert torch.bincount(row, minlength=passes).tolist() == per_pass
    if order == "spread":                  # the k-th block of the spread order is decided in pass k
        expect = torch.empty(n_new, dtype=torch.long)
        for k, (a, b) in enumerate(zip([0] + sizes, sizes)):
            expect[spread_order(n_new)[a:b]] = k
        assert (decided == expect).all()


def test_decided_pass_reads_the_inputs():
    """Three passes over 4 new positions after 1 known code (mask id 9): position 0 final from
    the first pass's output, positions 2, 3 from the second, position 1 last."""
    m = 9
    calls = [torch.tensor([[5, m, m, m, m]]), torch.tensor([[5, 1, m, m, m]]), torch.tensor([[5, 1, m, 2, 3]])]
    assert decided_pass(calls, m, known=1, n_new=4).tolist() == [[0, 2, 1, 1]]
    nll = torch.tensor([[1.0, 3.0, 5.0, 7.0]])
    assert _per_pass(nll, torch.tensor([[0, 2, 1, 1]])) == {"first": 1.0, "middle": 6.0, "last": 3.0}


def test_rescoring_redraws_only_the_codes_the_teacher_likes_least():
    """One round at fraction 1/4: known codes stay, every code that changed is among the quarter
    of new codes with the lowest teacher log-probability, and with R rounds at most R quarters
    change; fraction 0 or no rounds change nothing."""
    from benchmarks.student_diagnosis import rescore
    from fastjukebox import Prior
    student = _student()
    torch.manual_seed(1)
    teacher = Prior(student.config).eval()
    c = student.config
    g = torch.Generator().manual_seed(5)
    upper = torch.randint(0, c.l_bins, (4, c.n_ctx // c.cond_downsample), generator=g)
    z = torch.randint(0, c.l_bins, (4, c.n_ctx), generator=g)
    known, m = 8, (c.n_ctx - 8) // 4
    out = rescore(teacher, student, z, upper, None, known, 1, 0.25, 1.0, torch.Generator().manual_seed(6))
    assert torch.equal(out[:, :known], z[:, :known])
    logp = torch.log_softmax(teacher.logits(z, upper, None).float(), dim=-1)[:, known:]
    worst = logp.gather(-1, z[:, known:, None])[..., 0].topk(m, dim=1, largest=False).indices + known
    for row in range(4):
        changed = set((out[row] != z[row]).nonzero().flatten().tolist())
        assert changed and changed <= set(worst[row].tolist())
    out3 = rescore(teacher, student, z, upper, None, known, 3, 0.25, 1.0, torch.Generator().manual_seed(6))
    assert torch.equal(out3[:, :known], z[:, :known]) and int((out3 != z).sum(1).max()) <= 3 * m
    for rounds, fraction in ((0, 0.25), (2, 0.0)):
        assert torch.equal(rescore(teacher, student, z, upper, None, known, rounds, fraction, 1.0, None), z)


class _NeighbourStudent:
    """A stand-in student over 4 codes: certain of a code (probability 0.97) when its left
    neighbour is visible (the same code), uniform otherwise."""

    mask_id = 4

    class sampling:
        prefix_cache = False

    def condition(self, upper, labels):
        return None

    def logits_unchecked(self, tokens, cond, prefix_len=0, *, positions=None, cache=None):
        left = tokens.gather(1, positions - 1)                        # (N, T)
        logits = torch.zeros(*positions.shape, 4)
        seen = left != self.mask_id
        logits[seen] = torch.nn.functional.one_hot(left[seen], 4).float() * math.log(0.97 / 0.01)
        return logits


def test_context_use_falls_with_visible_neighbours():
    from benchmarks.student_diagnosis import context_use
    codes = torch.full((6, 64), 2)                                    # every code equals its neighbour
    out = context_use(_NeighbourStudent(), codes, torch.zeros(6, 1), None, known=16, fractions=(0.0, 0.5, 0.95),
                      generator=torch.Generator().manual_seed(0), batch_size=4)
    assert out["none"] == pytest.approx(2.0) and out["0"] < 2.0      # the first new position sees the prefix
    assert out["0"] > out["0.5"] > out["0.95"]
    assert out["0.95"] == pytest.approx(-math.log2(0.97), abs=0.2)
