"""Distillation windows whose upper codes are sampled by the upper teacher (distill.data
sampled_upper_windows, GenerationConfig.upper), on the tiny family."""
import json

import numpy as np
import pytest
import torch

import fastjukebox as fj
from distill.data import (GenerationConfig, SourcePiece, generate_shards, load_shards, real_windows,
                          sampled_upper_windows)


@pytest.fixture(scope="module")
def tiny():
    return fj.load("tiny")


def _pieces():
    rng = np.random.default_rng()
    t = np.arange(9001) / 44100
    return [SourcePiece(f"p{i}", (0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t)
                                  + 0.02 * rng.standard_normal(t.size)).astype(np.float32), artist=i, genre=i)
            for i in range(2)]


class ConstantUpper:
    """A stand-in upper sampler: fills every new position with 7 and records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, known, n_new, upper=None, labels=None, **knobs):
        self.calls.append((known.shape, n_new, upper, labels))
        return torch.cat([known, torch.full((known.shape[0], n_new), 7, dtype=torch.long)], dim=1)


def test_level0_windows_are_cut_from_upper_windows_sampled_by_the_upper_teacher(tiny):
    prior, up = tiny.prior(0), tiny.prior(1)
    c, cu = prior.config, up.config
    per, n_up = cu.sample_length // c.sample_length, c.n_ctx // c.cond_downsample
    fake = ConstantUpper()
    w = sampled_upper_windows(tiny.vqvae, prior, up, _pieces(), 5, torch.Generator().manual_seed(0),
                              batch_size=8, decoders={2: fake})
    assert per == 4 and w.real.shape == (5, c.n_ctx) and w.upper.shape == (5, n_up)
    assert torch.equal(w.upper, torch.full_like(w.upper, 7))            # the upper sampler's codes, not an encoding
    ((known_shape, n_new, upper, labels),) = fake.calls                 # 2 upper windows for 5 level-0 windows
    assert known_shape == (2, 0) and n_new == cu.n_ctx
    assert upper.shape == (2, cu.n_ctx // cu.cond_downsample) and labels.shape == (2, cu.label_len)
    # level-0 windows j = 0..3 of an upper window start j level-0 windows later in the same piece
    for i in range(5):
        parent = labels[i // per]
        row = w.labels[i]
        assert row.shape == (c.label_len,)
        assert int(row[0]) == int(parent[0]) and int(row[3]) == int(parent[3])    # same piece, same artist
        assert int(row[1]) == int(parent[1]) + (i % per) * c.sample_length
        assert int(row[2]) == c.sample_length


def test_sampled_upper_codes_come_from_the_upper_teacher_and_differ_from_the_real_ones(tiny):
    prior, up = tiny.prior(0), tiny.prior(1)
    pieces = _pieces()
    real = real_windows(tiny.vqvae, prior, pieces, 8, torch.Generator().manual_seed(0))
    w = sampled_upper_windows(tiny.vqvae, prior, up, pieces, 8, torch.Generator().manual_seed(0),
                              sample_generator=torch.Generator().manual_seed(1))
    again = sampled_upper_windows(tiny.vqvae, prior, up, pieces, 8, torch.Generator().manual_seed(0),
                                  sample_generator=torch.Generator().manual_seed(1))
    assert torch.equal(w.upper, again.upper) and torch.equal(w.real, again.real)     # reproducible per seed
    assert w.upper.min() >= 0 and w.upper.max() < up.config.l_bins
    # sampled codes are not the encoding: far fewer positions agree than between two encodings
    assert (w.upper == real.upper).float().mean() < 0.5


def test_shards_with_sampled_upper_codes_and_bad_settings(tiny, tmp_path):
    prior, up = tiny.prior(0), tiny.prior(1)
    gen = GenerationConfig(level=0, n_ctx=prior.config.n_ctx, shards=1, shard_size=6, k=4, batch_size=3,
                           model="tiny", upper="sampled")
    with pytest.raises(ValueError, match="level-1 teacher"):
        generate_shards(prior, tiny.vqvae, _pieces(), tmp_path / "s", gen, progress=False)
    generate_shards(prior, tiny.vqvae, _pieces(), tmp_path / "s", gen, progress=False, upper_prior=up)
    data = load_shards(tmp_path / "s")
    assert data["codes"].shape == (6, prior.config.n_ctx) and data["upper"].shape == (6, 16)
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["upper"] == "sampled"
    real_gen = GenerationConfig(**{**gen.__dict__, "upper": "real"})
    with pytest.raises(ValueError, match="other settings"):          # a directory of sampled-upper shards
        generate_shards(prior, tiny.vqvae, _pieces(), tmp_path / "s", real_gen, progress=False)
    with pytest.raises(ValueError, match="upper must be one of"):
        GenerationConfig(level=0, n_ctx=64, shards=1, shard_size=1, upper="encoded")
    with pytest.raises(ValueError, match="level-1 upsampler"):
        sampled_upper_windows(tiny.vqvae, prior, tiny.prior(2), _pieces(), 2, torch.Generator())


def test_a_shard_directory_from_before_the_upper_setting_is_real(tiny, tmp_path):
    prior = tiny.prior(1)
    gen = GenerationConfig(level=1, n_ctx=prior.config.n_ctx, shards=1, shard_size=2, k=4, batch_size=2, model="tiny")
    d = tmp_path / "s"
    generate_shards(prior, tiny.vqvae, _pieces(), d, gen, progress=False)
    meta = json.loads((d / "meta.json").read_text())
    del meta["upper"]
    (d / "meta.json").write_text(json.dumps(meta))
    generate_shards(prior, tiny.vqvae, _pieces(), d, GenerationConfig(**{**gen.__dict__, "shards": 2}), progress=False)
    assert load_shards(d)["codes"].shape[0] == 4


def test_evaluation_in_the_users_setting_conditions_on_sampled_upper_codes(tiny, tmp_path, monkeypatch):
    import distill.evaluate as ev
    from distill.student import ParallelStudent
    seen = []
    real = ev.sampled_upper_windows
    monkeypatch.setattr(ev, "sampled_upper_windows", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    d = tmp_path / "audio"
    d.mkdir()
    import soundfile as sf
    for i, p in enumerate(_pieces()):
        sf.write(d / f"p{i}.wav", np.tile(p.audio, 3), 44100)
    student = ParallelStudent.from_teacher(tiny.prior(0))
    r = ev.evaluate(tiny, student, data=str(d), windows=4, batch_size=4, c2st_steps=2, progress=False,
                    upper="sampled")
    assert r["upper"] == "sampled" and seen == [tiny.prior(1)]
    assert r["settings"]["hopped"]["teacher_nll_student"] > 0
    with pytest.raises(ValueError, match="level-2 upsampler"):
        ev.evaluate(tiny, ParallelStudent.from_teacher(tiny.prior(1)), data=str(d), windows=4, upper="sampled")


def test_sampled_upper_training_takes_no_real_codes_and_only_the_bottom_teacher(capsys):
    from distill.train import DistillConfig, main as train_main
    bottom = DistillConfig(teacher="bottom")         # the default recipe: upper codes as an upsample samples them
    assert (bottom.upper, bottom.real_ratio) == ("sampled", 0.0)
    assert DistillConfig(teacher="bottom", upper="real").real_ratio == 0.25
    middle = DistillConfig(teacher="middle")
    assert (middle.upper, middle.real_ratio) == ("real", 0.25)
    assert train_main(["--teacher", "bottom", "--real-ratio", "0.25"]) == 2
    assert "belong to its real upper codes" in capsys.readouterr().err
    assert train_main(["--teacher", "bottom", "--upper", "sampled", "--real-ratio", "0.25"]) == 2
    assert "belong to its real upper codes" in capsys.readouterr().err
    assert train_main(["--teacher", "middle", "--upper", "sampled"]) == 2
    assert "only --teacher bottom" in capsys.readouterr().err
