"""Training: VQ-VAE and prior losses fall, codebook restarts, checkpoints, resume, data, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastjukebox import VQVAE, Prior, PriorConfig, VQVAEConfig, load_prior, load_vqvae
from fastjukebox.checkpoint import CheckpointError
from fastjukebox.train import (AudioWindows, CodeWindows, PriorTask, TrainConfig, VQVAELossConfig, VQVAETask,
                               codebook_usage, prior_code_windows, reconstruction_metrics, train, train_prior,
                               train_vqvae)
from fastjukebox.train.codebook import CodebookEMA
from fastjukebox.train.loop import lr_factor

SR = 44100
VQ_CFG = VQVAEConfig(width=16, depth=2, emb_width=16, l_bins=32, multipliers=(1, 1, 1))


def sines(seconds: float, seed: int) -> np.ndarray:
    """A few seconds of a random mixture of sines with a slow amplitude envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = sum(rng.uniform(0.1, 0.25) * np.sin(2 * np.pi * rng.uniform(80, 3000) * t + rng.uniform(0, 6))
            for _ in range(3))
    return (x * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))).astype(np.float32)


def prior_cfg(level: int, **kw) -> PriorConfig:
    base = dict(level=level, n_ctx=64, width=32, depth=2, heads=1, attn_order=2, blocks=8, l_bins=32,
                y_bins=(10, 20), t_bins=16, min_duration=0.1, max_duration=20.0, cond_width=16, cond_depth=2)
    return PriorConfig(**{**base, **kw})


def pattern_codes(n_top: int, seed: int, l_bins: int = 32) -> list[np.ndarray]:
    """A repetitive top-level pattern and finer levels that follow it."""
    rng = np.random.default_rng(seed)
    period = rng.permutation(l_bins)[:5]
    z2 = np.tile(period, n_top // 5 + 1)[:n_top]
    z1 = (np.repeat(z2, 4) + np.tile([0, 1, 2, 3], n_top)) % l_bins
    z0 = np.repeat(z1, 4)
    return [z0, z1, z2]


def tcfg(out, **kw) -> TrainConfig:
    base = dict(steps=30, batch_size=4, out_dir=str(out), lr=3e-3, warmup_steps=3, log_every=1,
                checkpoint_every=1000, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def log_lines(path) -> list[dict]:
    return [json.loads(l) for l in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def trained_vqvae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq")
    pieces = [sines(1.3, 1), sines(2.1, 2)]
    model, res = train_vqvae(VQ_CFG, pieces, tcfg(out), window=4096)
    return model, res, pieces


# --- VQ-VAE ------------------------------------------------------------------------------------

def test_vqvae_reconstruction_loss_drops(trained_vqvae):
    _, res, _ = trained_vqvae
    log = log_lines(res.metrics_log)
    assert [r["step"] for r in log] == list(range(1, 31))
    for level in range(3):
        first = np.mean([r[f"l2_l{level}"] for r in log[:4]])
        last = np.mean([r[f"l2_l{level}"] for r in log[-4:]])
        assert last < 0.85 * first, f"level {level}: l2 {first:.4f} -> {last:.4f}"
    assert np.mean([r["loss"] for r in log[-4:]]) < 0.85 * np.mean([r["loss"] for r in log[:4]])


def test_saved_vqvae_loads_with_released_keys(trained_vqvae):
    model, res, pieces = trained_vqvae
    loaded = load_vqvae(res.component_dir)
    fresh_keys = set(VQVAE(VQ_CFG).state_dict())
    assert set(loaded.state_dict()) == fresh_keys == set(model.state_dict())
    assert {k for k in fresh_keys if k.startswith("bottleneck.")} == {f"bottleneck.level_blocks.{l}.k" for l in range(3)}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    audio = torch.from_numpy(pieces[1][: 3 * 1280])[None]
    for a, b in zip(loaded.encode(audio), model.encode(audio)):
        assert torch.equal(a, b)


def test_reconstruction_and_usage_metrics(trained_vqvae):
    model, _, pieces = trained_vqvae
    audio = torch.from_numpy(np.stack([pieces[0][:5000], pieces[1][:5000]]))
    rec = reconstruction_metrics(model, audio)
    use = codebook_usage(model, audio, batch_size=1)
    assert len(rec) == len(use) == 3
    codes = model.encode(audio[:, : 5000 // 128 * 128])
    for l in range(3):
        y = model.decode(codes[l], l)
        l2 = float((y - audio[:, : y.shape[1]]).pow(2).mean())
        assert rec[l]["l2"] == pytest.approx(l2, rel=1e-5)
        assert use[l]["used"] == len(torch.unique(codes[l]))
        assert 1.0 <= use[l]["perplexity"] <= use[l]["used"] + 1e-6


def is_row_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a),) whether each row of a equals some row of b exactly."""
    return (a[:, None, :] == b[None]).all(-1).any(1)


def test_codebook_ema_and_dead_code_restart():
    torch.manual_seed(0)
    vq = VQVAE(VQ_CFG)
    keys = set(vq.state_dict())
    ema = CodebookEMA(vq, mu=0.5, threshold=1.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(301, 16)
    assert ema.maybe_init(0, x, g) and not ema.maybe_init(0, x, g)
    k0 = vq.bottleneck.level_blocks[0].k.clone()
    assert is_row_of(k0, x).all()  # initial codes are rows of the data
    codes = torch.randint(0, 2, (301,), generator=torch.Generator().manual_seed(2))
    m = ema.update(0, x, codes, g)
    k = vq.bottleneck.level_blocks[0].k
    for c in (0, 1):
        n = float((codes == c).sum())
        want = (0.5 * k0[c] + 0.5 * x[codes == c].sum(0)) / (0.5 + 0.5 * n)
        torch.testing.assert_close(k[c], want)
    dead = torch.arange(2, 32)
    assert int(m["restarted"]) == 30 and int(m["usage"]) == 2 and int(m["used_curr"]) == 2
    assert is_row_of(k[dead], x).all()  # moved onto this batch's vectors
    assert not torch.equal(k[dead], k0[dead])
    assert set(vq.state_dict()) == keys
    sd = ema.state_dict()
    other = CodebookEMA(VQVAE(VQ_CFG))
    other.load_state_dict(sd)
    assert torch.equal(other.k_sum, ema.k_sum) and torch.equal(other.initialised, ema.initialised)


def test_vqvae_training_restarts_dead_codes(tmp_path):
    torch.manual_seed(3)
    vq = VQVAE(VQ_CFG)
    data = AudioWindows([sines(1.0, 5)], 2048, seed=1)
    task = VQVAETask(vq, data, VQVAELossConfig(mu=0.5), seed=0)
    task.loss(0, 2, torch.device("cpu"))
    assert bool(task.codebook.initialised.all())
    k = vq.bottleneck.level_blocks[2].k
    k[1:] += 1e3  # codes 1.. now attract no encoder vector: they die at the next update
    far = k.clone()
    loss, metrics = task.loss(1, 2, torch.device("cpu"))
    loss.backward()
    assert int(metrics["used_curr_l2"]) == 1 and int(metrics["restarted_l2"]) == 31
    assert float(k[1:].abs().max()) < 100 and not torch.equal(far, k)
    assert all(p.grad is not None for p in vq.encoders[0].parameters())


# --- priors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("level", [2, 1], ids=["top", "upsampler"])
def test_prior_loss_drops_on_repetitive_pattern(tmp_path, level):
    pieces = [pattern_codes(70, 1), pattern_codes(93, 2)]
    labels = [dict(artist=3, genre=[1, 2]), dict(artist=7, genre=4)]
    model, res = train_prior(prior_cfg(level), pieces, tcfg(tmp_path, steps=40), labels=labels)
    log = log_lines(res.metrics_log)
    first, last = np.mean([r["loss"] for r in log[:3]]), np.mean([r["loss"] for r in log[-3:]])
    assert first > 4.0 and last < 0.7 * first, f"bits/token {first:.3f} -> {last:.3f}"
    loaded = load_prior(res.component_dir)
    assert set(loaded.state_dict()) == set(Prior(prior_cfg(level)).state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_prior_label_rows_and_upper_codes():
    pieces = [pattern_codes(50, 4), pattern_codes(61, 5)]
    cfg = prior_cfg(1)
    data = prior_code_windows(cfg, pieces, [dict(artist=2, genre=[3]), dict(artist=9, genre=[1, 5])],
                              lengths=[50 * 128 + 17, 61 * 128], seed=3)
    task = PriorTask(Prior(cfg), data)
    b = data.batch(7, 6)
    y = task.labels(b)
    assert y.shape == (6, cfg.label_len)
    for row, i, off, up, tok in zip(y.tolist(), b.piece.tolist(), b.offset.tolist(), b.upper, b.tokens):
        start = off // 32
        assert off % (32 * 4) == 0 and row[1] == off and row[2] == cfg.sample_length
        assert row[0] == [50 * 128 + 17, 61 * 128][i]
        assert row[3] == [2, 9][i] and row[4:] == [[3, -1, -1, -1, -1], [1, 5, -1, -1, -1]][i]
        assert torch.equal(tok, torch.from_numpy(pieces[i][1][start:start + 64]))
        assert torch.equal(up, torch.from_numpy(pieces[i][2][start // 4:start // 4 + 16]))


def test_upper_noise_corrupts_the_given_share_of_upper_codes():
    cfg = prior_cfg(1)
    data = prior_code_windows(cfg, [pattern_codes(400, 4)], [dict(artist=2, genre=[3])], seed=3)
    upper = data.batch(0, 64).upper
    assert upper.numel() == 64 * 16
    assert torch.equal(PriorTask(Prior(cfg), data).corrupt_upper(upper, 5), upper)     # off by default
    task = PriorTask(Prior(cfg), data, seed=1, upper_noise=0.3)
    a, again, other = (task.corrupt_upper(upper, s) for s in (5, 5, 6))
    assert torch.equal(a, again) and not torch.equal(a, other)       # a function of (seed, step)
    assert a.dtype == upper.dtype and 0 <= int(a.min()) and int(a.max()) < cfg.l_bins
    # replaced codes are uniform, so 1/l_bins of the replacements keep their value
    changed = (a != upper).float().mean().item()
    assert abs(changed - 0.3 * (1 - 1 / cfg.l_bins)) < 0.05, changed
    # the loss sees the corrupted codes: with noise the loss of the same batch differs
    torch.manual_seed(0)
    clean = PriorTask(Prior(cfg), data, seed=1)
    torch.manual_seed(0)
    noisy = PriorTask(Prior(cfg), data, seed=1, upper_noise=0.9)
    assert clean.loss(5, 4, torch.device("cpu"))[0].item() != noisy.loss(5, 4, torch.device("cpu"))[0].item()


def test_upper_noise_is_validated():
    cfg = prior_cfg(1)
    data = prior_code_windows(cfg, [pattern_codes(80, 4)], [dict(artist=2, genre=[3])])
    with pytest.raises(ValueError, match=r"upper_noise must be in \[0, 1\)"):
        PriorTask(Prior(cfg), data, upper_noise=1.0)
    top = prior_cfg(2)
    with pytest.raises(ValueError, match="this prior has none"):
        PriorTask(Prior(top), prior_code_windows(top, [pattern_codes(80, 1)], [dict(artist=1)]), upper_noise=0.1)


def test_prior_bad_labels_and_short_pieces_are_named():
    cfg = prior_cfg(2)
    with pytest.raises(ValueError, match="artist id 25"):
        PriorTask(Prior(cfg), prior_code_windows(cfg, [pattern_codes(80, 1)], [dict(artist=25)]))
    with pytest.raises(ValueError, match="none of the 1 pieces is usable.*64 level-2 codes"):
        prior_code_windows(cfg, [pattern_codes(40, 1)])
    with pytest.raises(ValueError, match="total length"):
        prior_code_windows(prior_cfg(2, max_duration=0.15), [pattern_codes(80, 1)])


# --- data --------------------------------------------------------------------------------------

def test_audio_windows_deterministic_and_int16():
    a = (np.random.default_rng(0).uniform(-0.9, 0.9, 3001) * 32767).astype(np.int16)
    b = sines(0.05, 3)
    data = AudioWindows([a, b], 1000, seed=11)
    x1, x2, x3 = data.batch(5, 7), data.batch(5, 7), data.batch(6, 7)
    assert torch.equal(x1.audio, x2.audio) and not torch.equal(x1.audio, x3.audio)
    for w, i, off in zip(x1.audio, x1.piece.tolist(), x1.offset.tolist()):
        src = a.astype(np.float32) / 32768 if i == 0 else b
        seg = src[off:off + 1000]
        assert torch.equal(w[: len(seg)], torch.from_numpy(seg)) and not w[len(seg):].any()
    assert AudioWindows([a], 1000, seed=12).batch(5, 7).offset.tolist() != AudioWindows([a], 1000, seed=11).batch(5, 7).offset.tolist()
    with pytest.raises(ValueError, match="NaN"):
        AudioWindows([np.array([0.1, np.nan], dtype=np.float32)], 2)


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.1, abs=1e-3)


# --- checkpoints and resume ----------------------------------------------------------------------

def _vq_task(seed_model: int):
    torch.manual_seed(seed_model)
    data = AudioWindows([sines(0.7, 8), sines(0.4, 9)], 2048, seed=4)
    return VQVAETask(VQVAE(VQ_CFG), data, seed=2)


def _prior_task(seed_model: int):
    torch.manual_seed(seed_model)
    data = prior_code_windows(prior_cfg(1), [pattern_codes(40, 6)], [dict(artist=1, genre=2)], seed=5)
    return PriorTask(Prior(prior_cfg(1)), data, seed=2)


@pytest.mark.parametrize("make", [_vq_task, _prior_task], ids=["vqvae", "prior"])
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, make):
    full = make(0)
    train(full, tcfg(tmp_path / "a", steps=7, batch_size=2, checkpoint_every=2))
    cut = make(0)
    res = train(cut, tcfg(tmp_path / "b", steps=7, batch_size=2, checkpoint_every=2, stop_at=3))
    assert res.step == 3 and not res.finished
    again = make(123)  # a fresh process: other initial weights, all restored from the checkpoint
    res = train(again, tcfg(tmp_path / "b", steps=7, batch_size=2, checkpoint_every=2, resume=True))
    assert res.finished and res.step == 7
    for k, v in full.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k
    for k, v in full.state_dict().get("codebook", {}).items():
        assert torch.equal(again.state_dict()["codebook"][k], v), k
    assert [r["step"] for r in log_lines(res.metrics_log)] == list(range(1, 8))
    a_log, b_log = log_lines(tmp_path / "a" / f"train_{full.name}" / "metrics.jsonl"), log_lines(res.metrics_log)
    assert [r["loss"] for r in a_log] == [r["loss"] for r in b_log]


def test_corrupt_or_foreign_checkpoint_gives_clear_error(tmp_path):
    task = _prior_task(0)
    res = train(task, tcfg(tmp_path, steps=2, batch_size=2))
    ck = res.checkpoint
    blob = ck.read_bytes()
    ck.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(_prior_task(0), tcfg(tmp_path, steps=4, batch_size=2, resume=True))
    ck.write_bytes(blob)
    with pytest.raises(CheckpointError, match="different run.*batch_size"):
        train(_prior_task(0), tcfg(tmp_path, steps=2, batch_size=3, resume=True))


def test_vqvae_task_rejects_bad_window():
    with pytest.raises(ValueError, match="multiple of the top hop length 128"):
        VQVAETask(VQVAE(VQ_CFG), AudioWindows([sines(0.2, 1)], 2000))


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_vqvae_encode_prior_makes_a_loadable_bundle(tmp_path, capsys):
    import soundfile as sf
    import fastjukebox
    from fastjukebox.train.__main__ import main
    songs = tmp_path / "songs"
    songs.mkdir()
    for i in range(2):
        sf.write(songs / f"s{i}.wav", sines(0.9 + 0.4 * i, 20 + i), SR, subtype="PCM_16")
    (songs / "labels.json").write_text(json.dumps({"s0.wav": {"artist": 4, "genre": [2]},
                                                   "s1.wav": {"artist": 6, "genre": 1}}))
    (tmp_path / "vq.json").write_text(json.dumps({"kind": "vqvae", **VQ_CFG.to_dict()}))
    (tmp_path / "top.json").write_text(json.dumps({"kind": "prior", **prior_cfg(2, n_ctx=32, blocks=4).to_dict()}))
    run, codes = tmp_path / "run", tmp_path / "codes"
    common = ["--steps", "2", "--batch-size", "2", "--out", str(run), "--no-progress", "--device", "cpu"]
    assert main(["vqvae", "--config", str(tmp_path / "vq.json"), "--data", str(songs),
                 "--window-seconds", "0.1", *common]) == 0
    assert main(["encode", "--vqvae", str(run / "vqvae"), "--data", str(songs), "--out", str(codes)]) == 0
    assert sorted(p.name for p in codes.iterdir()) == ["s0.npz", "s1.npz"]
    assert main(["prior", "--config", str(tmp_path / "top.json"), "--data", str(codes), *common]) == 0
    jb = fastjukebox.load(run)
    assert jb.levels == [2] and jb.vqvae.config == VQ_CFG
    (tmp_path / "up.json").write_text(json.dumps({"kind": "prior", **prior_cfg(1, n_ctx=32, blocks=4).to_dict()}))
    assert main(["prior", "--config", str(tmp_path / "up.json"), "--data", str(codes), "--upper-noise", "0.2",
                 *common]) == 0
    assert fastjukebox.load(run).levels == [1, 2]
    capsys.readouterr()
    assert main(["prior", "--config", str(tmp_path / "top.json"), "--data", str(codes), "--upper-noise", "0.2",
                 "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "run2"), "--no-progress",
                 "--device", "cpu"]) == 2
    assert "upper_noise corrupts the upper-level codes of an upsampler" in capsys.readouterr().err
    assert main(["prior", "--config", "nonexistent.json", "--data", str(codes), *common]) == 2
