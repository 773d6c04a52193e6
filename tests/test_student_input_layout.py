"""The shifted input layout of the parallel students: each position reads its left neighbour's
code (as the autoregressive teacher's input does), never its own; saved with the student."""
import pytest
import torch

from distill.sampler import ParallelWindowSampler
from distill.student import ParallelStudent
from fastjukebox import Prior, PriorConfig


def _config():
    return PriorConfig(level=0, n_ctx=40, width=32, depth=2, heads=2, attn_order=2, blocks=5, l_bins=27,
                       y_bins=(6, 9), max_bow_genre_size=2, cond_width=8, cond_depth=1, cond_dilation_cycle=None,
                       labels=False)


def _inputs(c, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, c.l_bins, (n, c.n_ctx), generator=g),
            torch.randint(0, c.l_bins, (n, c.n_ctx // c.cond_downsample), generator=g))


@torch.no_grad()
def test_a_masked_position_reads_its_left_neighbour():
    """Masked positions 20..39: a new code at 19 moves the logits of position 20, whose input it
    is, far more than those of the masked positions after it (which reach it only through
    attention)."""
    torch.manual_seed(0)
    teacher = Prior(_config()).eval()
    student = ParallelStudent.from_teacher(teacher, "shifted").eval()
    c = student.config
    z, upper = _inputs(c, 2)
    cond = student.condition(upper, None)
    tokens = z.clone()
    tokens[:, 20:] = student.mask_id
    pos = torch.arange(20, 24).expand(2, -1)
    base = student.logits_unchecked(tokens, cond, positions=pos)
    nudged = tokens.clone()
    nudged[:, 19] = (tokens[:, 19] + 1) % c.l_bins
    moved = student.logits_unchecked(nudged, cond, positions=pos)
    assert (moved[:, 0] - base[:, 0]).abs().mean() > 10 * (moved[:, 1:] - base[:, 1:]).abs().mean()


def test_the_layout_is_saved_and_named(tmp_path):
    torch.manual_seed(0)
    student = ParallelStudent.from_teacher(Prior(_config()), "shifted")
    student.save(tmp_path / "s")
    loaded = ParallelStudent.load(tmp_path / "s")
    assert loaded.prior.input_layout == "shifted"
    for k, v in student.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    ParallelStudent.from_teacher(Prior(_config())).save(tmp_path / "t")
    assert ParallelStudent.load(tmp_path / "t").prior.input_layout == "tokens"
    with pytest.raises(ValueError, match="input_layout must be one of"):
        ParallelStudent(_config(), "reversed")
    import json
    from fastjukebox.checkpoint import CheckpointError
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    (tmp_path / "s" / "config.json").write_text(json.dumps({**cfg, "input_layout": "sideways"}))
    with pytest.raises(CheckpointError, match=r"config.json: not a valid student config.*sideways"):
        ParallelStudent.load(tmp_path / "s")
    with pytest.raises(ValueError, match="needs the code left of position 12"):
        loaded.prior.embed(torch.zeros(1, 28, dtype=torch.long), None, None, lo=12)


def test_a_shifted_student_samples_whole_windows_keeping_known_codes():
    torch.manual_seed(0)
    student = ParallelStudent.from_teacher(Prior(_config()), "shifted").eval()
    c = student.config
    z, upper = _inputs(c, 3, seed=1)
    for order in ("confidence", "spread"):
        out = ParallelWindowSampler(student, passes=4, order=order)(z[:, :12], c.n_ctx - 12, upper, None,
                                                                     generator=torch.Generator().manual_seed(2))
        assert out.shape == (3, c.n_ctx) and torch.equal(out[:, :12], z[:, :12])
        assert int(out.max()) < c.l_bins


def test_distill_train_names_a_bad_input_layout(tmp_path):
    from distill.train import DistillConfig
    DistillConfig(teacher="bottom", out=str(tmp_path / "r"), input_layout="shifted")
    with pytest.raises(ValueError, match="--input-layout"):
        DistillConfig(teacher="bottom", out=str(tmp_path / "r"), input_layout="sideways", prefix_layout=False)
    DistillConfig(teacher="bottom", out=str(tmp_path / "r"), input_layout="shifted", prefix_layout=False)
