"""The bundled demo family (``fastjukebox/assets/demo``) and its builder.

The real build takes 20-40 minutes on two CPU cores and is not run here; ``test_tiny_build_*``
runs every stage of the same code at ``--scale 0.01`` (a few steps, two short pieces).
"""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch

import fastjukebox as fj
from fastjukebox.bundle import ASSETS
from fastjukebox.demo.evaluate import (REQUIRED_MARGIN_BITS, heldout_nll, load_eval_codes, tonal_fraction,
                                       unigram_bits)

DEMO = ASSETS / "demo"


@pytest.fixture(scope="module")
def demo():
    return fj.load("demo")


def test_demo_loads_offline(monkeypatch):
    def no_network(*a, **k):
        raise OSError("network access attempted while loading the demo family")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    jb = fj.load("demo")
    from fastjukebox.demo.corpus import ARTISTS, GENRES
    assert jb.levels == [0, 1, 2]
    assert tuple(jb.vqvae.hop_lengths) == (8, 32, 128)
    assert jb.vqvae.config.l_bins == 256
    top = jb.prior(2).config
    assert top.n_ctx == 256 and top.y_bins == (len(GENRES), len(ARTISTS))
    for level in (0, 1):
        c = jb.prior(level).config
        assert c.n_ctx == 1024 and c.block_len == 64 and c.cond_downsample == 4
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size <= 30 * 2 ** 20, f"demo family is {size / 2 ** 20:.1f} MiB"
    info = json.loads((DEMO / "build_info.json").read_text())
    assert info["total_seconds"] > 0 and set(info["stage_seconds"]) >= {"vqvae", "prior_2", "prior_1", "prior_0"}
    # the top prior's timing range covers every piece it was trained on
    lo, hi = info["top_prior_duration_range"]
    assert (top.min_duration, top.max_duration) == (lo, hi)
    from fastjukebox.demo.build import SAMPLING
    assert jb.sampling_defaults.to_json() == SAMPLING           # sampling.json as the build writes it


@pytest.mark.parametrize("level", [2, 1, 0])
def test_heldout_nll_beats_unigram(demo, level):
    pieces, counts = load_eval_codes(DEMO)
    assert len(pieces) >= 2
    prior = demo.prior(level)
    windows = 2 if level < 2 else 4
    nll = heldout_nll(prior, pieces, max_windows=windows)
    uni = unigram_bits(counts, pieces, level, prior.config.n_ctx, max_windows=windows)
    assert nll["tokens"] >= 2 * prior.config.n_ctx
    assert nll["bits"] <= uni - REQUIRED_MARGIN_BITS, (
        f"level {level}: held-out {nll['bits']:.3f} bits/token vs unigram {uni:.3f}")


def test_heldout_nll_sees_the_codes(demo):
    """A scrambled piece must score worse than the real one (the NLL is not label-only)."""
    pieces, _ = load_eval_codes(DEMO)
    prior = demo.prior(2)
    real = heldout_nll(prior, pieces[:1], max_windows=2)["bits"]
    rng = np.random.default_rng(7)
    p = pieces[0]
    shuffled = [p.codes[0], p.codes[1], rng.permutation(p.codes[2])]
    fake = heldout_nll(prior, [type(p)(shuffled, p.length, p.artist, p.genre)], max_windows=2)["bits"]
    assert fake > real + 0.5


def test_sample_five_seconds(demo):
    """5 s through all three levels: the expected code lengths, audio finite, within [-1, 1]
    and not silent."""
    out = demo.sample(artist=2, genre=1, seconds=5.0, seed=3, progress=False)
    n_top = 5 * 44100 // 128
    assert [z.shape for z in out.codes] == [(1, 16 * n_top), (1, 4 * n_top), (1, n_top)]
    assert out.audio.shape == (1, n_top * 128)
    assert torch.isfinite(out.audio).all() and out.audio.abs().max() <= 1.0
    rms = out.audio.pow(2).mean().sqrt()
    assert rms > 1e-2, f"sample is (nearly) silent: RMS {rms:.2e}"
    # not silent anywhere for long: every second carries sound
    per_second = out.audio[0, : 4 * 44100].reshape(4, 44100).pow(2).mean(-1).sqrt()
    assert (per_second > 1e-3).all(), per_second
    # pitched energy well above noise (white noise scores about 0.02, the rendered corpus 0.98;
    # docs/demo_quality.md lists the family's samples)
    tonal = tonal_fraction(out.audio[0])
    assert tonal > 0.5, f"the sample is mostly noise: tonal fraction {tonal:.3f}"


# --- the builder -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    from fastjukebox.demo.build import build, plan_for_scale
    tmp = tmp_path_factory.mktemp("demo_build")
    out, work, cache = tmp / "demo", tmp / "work", tmp / "cache"
    plan = plan_for_scale(0.01)
    info = build(out, plan=plan, work=work, cache_dir=cache, progress=False, log=lambda s: None)
    return out, work, cache, plan, info


def test_cropped_pieces_keep_their_score_text_aligned(tiny_build):
    from fastjukebox.demo.build import _pieces
    from fastjukebox.demo.score_text import cells_for
    _, _, cache, plan, _ = tiny_build
    train, held = _pieces(plan, cache, progress=False)
    assert plan.crop_seconds is not None
    for p in train + held:
        assert len(p.audio) == int(plan.crop_seconds * 44100)
        assert len(p.score_text) == 4 * cells_for(len(p.audio))


def test_tiny_build_runs_every_stage_and_resumes(tiny_build):
    from fastjukebox.demo.build import STAGES, build, plan_for_scale
    out, work, cache, plan, info = tiny_build
    logs: list[str] = []
    assert list(info["stage_seconds"]) == list(STAGES)
    assert info["steps"]["vqvae"] == plan.vqvae_steps and info["machine"]["torch"] == torch.__version__
    jb = fj.load(out)
    assert jb.levels == [0, 1, 2] and (out / "eval_codes.npz").is_file()
    from fastjukebox.demo.build import SAMPLING
    assert jb.sampling_defaults.to_json() == SAMPLING           # the recommended settings ship with it
    pieces, counts = load_eval_codes(out)
    assert counts.shape == (3, 256) and counts.sum() > 0 and len(pieces) == plan.heldout_chorales
    weights = (out / "prior_level_0" / "model.safetensors").read_bytes()

    logs.clear()
    again = build(out, plan=plan, work=work, cache_dir=cache, resume=True, progress=False, log=logs.append)
    assert sum("already done" in line for line in logs) == len(STAGES) - 1  # corpus is always loaded
    assert (out / "prior_level_0" / "model.safetensors").read_bytes() == weights
    assert again["stage_seconds"] == info["stage_seconds"]

    with pytest.raises(ValueError, match="another plan"):
        build(out, plan=plan_for_scale(0.02), work=work, cache_dir=cache, resume=True, progress=False,
              log=logs.append)


def test_tiny_build_resumes_an_interrupted_stage(tiny_build):
    """A build stopped inside the upsampler stage continues from its checkpoint."""
    from fastjukebox.demo.build import _State, build
    out, work, cache, plan, _ = tiny_build
    state = _State(work, plan, resume=True)
    del state.data["done"]["prior_0"], state.data["done"]["ship"]
    state.save()
    logs: list[str] = []
    build(out, plan=plan, work=work, cache_dir=cache, resume=True, progress=False, log=logs.append)
    assert any(line.startswith("[prior_0] ...") for line in logs)
    assert any("[prior_1] already done" in line for line in logs)
    assert fj.load(out).prior(0).config.n_ctx == 1024


def test_scale_is_validated():
    from fastjukebox.demo.build import plan_for_scale
    with pytest.raises(ValueError, match="scale"):
        plan_for_scale(0)
    full, small = plan_for_scale(1.0), plan_for_scale(0.01)
    assert small.vqvae_steps < full.vqvae_steps and small.crop_seconds is not None and full.crop_seconds is None


def test_upsampler_processes_is_validated(tmp_path):
    from dataclasses import replace

    from fastjukebox.demo.build import build, plan_for_scale
    with pytest.raises(ValueError, match="upsampler_processes"):
        build(tmp_path / "out", plan=replace(plan_for_scale(0.01), upsampler_processes=3), work=tmp_path / "w",
              progress=False, log=lambda s: None)


def test_worker_process_upsamplers_match_sequential(tiny_build, tmp_path, capsys):
    """``upsampler_processes=2`` (the default) trains the two upsamplers at the same time in
    worker processes, one thread each; ``1`` (CLI ``--upsampler-processes 1``) trains them in turn
    here. With one thread the weights are the same."""
    from dataclasses import replace

    from fastjukebox.demo.__main__ import main
    from fastjukebox.demo.build import build, plan_for_scale
    out, _, cache, plan, _ = tiny_build
    assert plan == plan_for_scale(0.01) and plan.upsampler_processes == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capsys.readouterr()
        assert main(["build", "--scale", "0.01", "--out", str(tmp_path / "demo1"), "--work", str(tmp_path / "work1"),
                     "--cache-dir", str(cache), "--upsampler-processes", "1", "--no-progress"]) == 0
        assert "worker process" not in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    info = json.loads((tmp_path / "demo1" / "build_info.json").read_text())
    assert info["plan"] == replace(plan, upsampler_processes=1).to_dict()
    for level in (0, 1):
        a, b = (fj.load(d).prior(level).state_dict() for d in (tmp_path / "demo1", out))
        assert all(torch.equal(a[k], b[k]) for k in a), f"level {level} upsampler differs"
