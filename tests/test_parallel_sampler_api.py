"""The distilled student as sampler "parallel" in ``Jukebox.sample`` / ``upsample``, ``load`` and the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastjukebox
from distill.student import ParallelStudent
from fastjukebox.bundle import Jukebox
from fastjukebox.cli import main as cli_main
from fastjukebox.samplers import SAMPLERS


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The tiny family with students for both upsamplers, saved and loaded back."""
    jb = fastjukebox.load("tiny")
    torch.manual_seed(0)
    students = {level: ParallelStudent.from_teacher(jb.prior(level)) for level in (0, 1)}
    path = tmp_path_factory.mktemp("family")
    Jukebox(jb.vqvae, {l: jb.prior(l) for l in jb.levels}, students).save(path)
    return path


def test_load_finds_students(family):
    jb = fastjukebox.load(family)
    assert sorted(jb.students) == ["0", "1"]
    assert isinstance(jb.student(1), ParallelStudent)
    with pytest.raises(ValueError, match="no parallel student for level 1"):
        fastjukebox.load("tiny").student(1)


def test_upsample_parallel_counts_passes(family, monkeypatch):
    """Each upsampler window costs exactly ``passes`` student evaluations (no teacher steps)."""
    jb = fastjukebox.load(family)
    calls = {0: 0, 1: 0}
    for level in (0, 1):
        student = jb.student(level)
        orig = student.logits_unchecked

        def counted(*a, _orig=orig, _level=level, **k):
            calls[_level] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(student, "logits_unchecked", counted)
    top = jb.prior(2).config
    z_top = torch.randint(0, top.l_bins, (2, top.n_ctx))
    res = jb.upsample(z_top, sampler="parallel", passes=3, seed=0, progress=False)
    assert res.codes[1].shape[1] == top.n_ctx * 4 and res.codes[0].shape[1] == top.n_ctx * 16
    assert calls[0] > 0 and calls[1] > 0
    assert calls[0] % 3 == 0 and calls[1] % 3 == 0
    assert res.audio.abs().max() <= 1.0
    # Same seed, same result; the AR sampler gives other codes from the same inputs.
    again = jb.upsample(z_top, sampler="parallel", passes=3, seed=0, progress=False)
    assert torch.equal(res.codes[0], again.codes[0])
    assert res.settings["sampler"] == {1: "parallel", 0: "parallel"} and res.settings["passes"] == {1: 3, 0: 3}
    ar = jb.upsample(z_top, sampler="ar", seed=0, progress=False)
    assert not torch.equal(ar.codes[0], res.codes[0]) and not torch.equal(ar.codes[1], res.codes[1])


def test_mixed_samplers_and_unknown_name(family):
    jb = fastjukebox.load(family)
    top = jb.prior(2).config
    z_top = torch.randint(0, top.l_bins, (1, top.n_ctx))
    res = jb.upsample(z_top, sampler={1: "ar", 0: "parallel"}, passes=2, seed=1, progress=False)
    assert res.codes[0].shape == (1, top.n_ctx * 16)
    with pytest.raises(ValueError, match="unknown sampler 'fast'"):
        jb.upsample(z_top, sampler="fast", progress=False)
    assert set(SAMPLERS) >= {"ar", "parallel"}


def test_cli_sampler_parallel(family, tmp_path, monkeypatch):
    """The command line's ``--sampler 1=parallel,0=parallel --passes 2`` runs the students (and
    only whole passes of them) and records what ran."""
    import json
    calls = []
    orig = ParallelStudent.logits_unchecked

    def counted(self, *a, **k):
        calls.append(self.config.level)
        return orig(self, *a, **k)

    monkeypatch.setattr(ParallelStudent, "logits_unchecked", counted)
    out = tmp_path / "s.wav"
    rc = cli_main(["sample", "--model", str(family), "--seconds", "0.8", "--n-samples", "1", "--seed", "0",
                   "--sampler", "1=parallel,0=parallel", "--passes", "2", "--quiet", "--out", str(out)])
    assert rc == 0
    assert calls.count(0) > 0 and calls.count(1) > 0 and calls.count(0) % 2 == 0 and calls.count(1) % 2 == 0
    codes = np.load(out.with_suffix(".npz"))
    settings = json.loads(str(codes["settings"]))
    assert settings["sampler"] == {"2": "ar", "1": "parallel", "0": "parallel"}
    assert settings["passes"] == {"1": 2, "0": 2}
    assert codes["codes_level0"].shape[0] == 1
