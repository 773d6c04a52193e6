"""Distillation data, training and evaluation on the tiny family (distill/data, train, evaluate)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastjukebox as fj
from distill.data import (CorruptShardError, GenerationConfig, generate_shards, load_pieces, load_shards, read_shard,
                          shard_path, write_shard)
from distill.evaluate import REQUIRED_KEYS, SETTING_KEYS
from distill.evaluate import main as evaluate_main
from distill.train import DistillConfig, DistillLoss, main as train_main, make_batch, train

ROOT = Path(__file__).resolve().parents[1]
SHARDS, SHARD_SIZE, K = 3, 8, 8


@pytest.fixture(scope="module")
def tiny():
    return fj.load("tiny")


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    """Two files of fresh random tone mixtures with noise, lengths not multiples of any hop."""
    import soundfile as sf
    d = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng()
    for i, n in enumerate((30011, 26987)):
        t = np.arange(n) / 44100
        x = sum(rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * rng.uniform(80, 4000) * t + rng.uniform(0, 6))
                for _ in range(4)) + 0.02 * rng.standard_normal(n)
        sf.write(d / f"piece{i}.wav", np.clip(x, -1, 1).astype(np.float32), 44100)
    return d


def _gen(audio_dir) -> GenerationConfig:
    return GenerationConfig(level=1, n_ctx=64, shards=SHARDS, shard_size=SHARD_SIZE, k=K, seed=0, batch_size=5,
                            model="tiny",
                            data=str(audio_dir))


@pytest.fixture(scope="module")
def shard_dir(tiny, audio_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    pieces = load_pieces(audio_dir, "train", tiny.sr)
    generate_shards(tiny.prior(1), tiny.vqvae, pieces, d, _gen(audio_dir), progress=False)
    return d


def _argv(audio_dir, shard_dir, out, steps, *extra):
    return ["--teacher", "middle", "--model", "tiny", "--data", str(audio_dir), "--shards-dir", str(shard_dir),
            "--out", str(out), "--steps", str(steps), "--shards", str(SHARDS), "--shard-size", str(SHARD_SIZE),
            "--k", str(K), "--gen-batch-size", "5", "--batch-size", "6", "--warmup", "5", "--lr", "1e-3", "--no-progress", *extra]


def _same_shard(a: Path, b: Path) -> bool:
    """Same tensors and metadata (the header's key order is not fixed, so bytes may differ)."""
    (x, mx), (y, my) = read_shard(a), read_shard(b)
    return mx == my and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _weights(student_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(student_dir / "model.safetensors")


# --- shards ---------------------------------------------------------------------------------

def test_shard_round_trip_and_teacher_targets(tiny, shard_dir, tmp_path):
    x = {"a": torch.randn(3, 7, 5), "b": torch.randint(-9, 9, (11,)), "c": torch.rand(2, 3).half()}
    path = write_shard(tmp_path / "s.safetensors", x, {"note": "x"})
    y, meta = read_shard(path)
    assert set(y) == set(x) and all(torch.equal(x[k], y[k]) for k in x)
    assert meta["note"] == "x" and len(meta["checksum"]) == 64
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    d = load_shards(shard_dir, expect=SHARDS)
    prior = tiny.prior(1)
    S = SHARDS * SHARD_SIZE
    assert d["codes"].shape == d["real"].shape == (S, 64) and d["upper"].shape == (S, 16)
    assert d["topk_ids"].shape == d["topk_probs"].shape == (S, 64, K) and d["labels"].shape == (S, 9)
    assert 0 <= int(d["codes"].min()) and int(d["codes"].max()) < 64
    # stored probabilities are the teacher's, recomputed here by a teacher-forced pass
    i = 5
    logp = torch.log_softmax(prior.logits(d["codes"][i:i + 1], d["upper"][i:i + 1], d["labels"][i:i + 1]), -1)[0]
    torch.testing.assert_close(d["token_prob"][i], logp.gather(-1, d["codes"][i][:, None])[:, 0].exp(),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d["topk_probs"][i], logp.exp().topk(K, -1).values, rtol=1e-4, atol=1e-6)
    assert (d["topk_probs"][..., :-1] >= d["topk_probs"][..., 1:]).all()
    assert (d["topk_probs"][..., 0] >= d["token_prob"] - 1e-6).all()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_shard_is_named_refused_skipped_and_remade(audio_dir, shard_dir, tmp_path, damage):
    d = tmp_path / "shards"
    shutil.copytree(shard_dir, d)
    victim = shard_path(d, 1)
    raw = bytearray(victim.read_bytes())
    if damage == "flip":
        for j in (len(raw) - 5, len(raw) // 2 + 3):
            raw[j] ^= 0xFF
    else:
        raw = raw[: len(raw) * 2 // 3]
    victim.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match=victim.name):
        load_shards(d)
    with pytest.warns(UserWarning, match=victim.name):
        part = load_shards(d, on_corrupt="skip")
    assert part["codes"].shape[0] == (SHARDS - 1) * SHARD_SIZE
    # a training run reports it by name and makes it again (shard i depends only on seed and i)
    with pytest.warns(UserWarning, match=victim.name):
        assert train_main(_argv(audio_dir, d, tmp_path / "run", 2, "--no-eval")) == 0
    assert _same_shard(victim, shard_path(shard_dir, 1))


def test_generation_resumes_and_splits_by_rank(tiny, audio_dir, shard_dir, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(shard_dir, d)
    shard_path(d, 2).unlink()
    before = {i: shard_path(d, i).stat().st_mtime_ns for i in (0, 1)}
    pieces = load_pieces(audio_dir, "train", tiny.sr)
    time.sleep(0.01)
    generate_shards(tiny.prior(1), tiny.vqvae, pieces, d, _gen(audio_dir), progress=False)
    assert {i: shard_path(d, i).stat().st_mtime_ns for i in (0, 1)} == before   # finished shards kept
    assert _same_shard(shard_path(d, 2), shard_path(shard_dir, 2))
    # rank 1 of 2 makes only the odd shards, identical to a single process's
    r = tmp_path / "rank1"
    mine = generate_shards(tiny.prior(1), tiny.vqvae, pieces, r, _gen(audio_dir), rank=1, world_size=2,
                           progress=False)
    assert sorted(p.name for p in r.glob("shard-*")) == [shard_path(r, 1).name] == [p.name for p in mine]
    assert _same_shard(shard_path(r, 1), shard_path(shard_dir, 1))
    bad = GenerationConfig(**{**_gen(audio_dir).__dict__, "temperature": 0.5})
    with pytest.raises(ValueError, match="temperature"):
        generate_shards(tiny.prior(1), tiny.vqvae, pieces, d, bad, progress=False)


# --- training -------------------------------------------------------------------------------

def _masked_ce(student, data, seed=123) -> float:
    g = torch.Generator().manual_seed(seed)
    batch = make_batch(data, 24, student.mask_id, g, real_ratio=0.0, prefix_prob=0.0)
    with torch.no_grad():
        return float(DistillLoss(student, 0.0)(**batch)["ce_bits"])


def test_training_reduces_masked_loss(tiny, audio_dir, shard_dir, tmp_path):
    from distill.student import ParallelStudent
    out = tmp_path / "run"
    cfg = DistillConfig(teacher="middle", model="tiny", data=str(audio_dir), shards_dir=str(shard_dir), out=str(out),
                        steps=40, shards=SHARDS, shard_size=SHARD_SIZE, k=K, gen_batch_size=5, batch_size=8,
                        warmup=5, lr=2e-3,
                        real_ratio=0.0, soft_weight=0.5, log_every=5, ckpt_every=20, evaluate=False, progress=False)
    train(cfg)
    data = load_shards(shard_dir)
    before = _masked_ce(ParallelStudent.from_teacher(tiny.prior(1)), data)
    after = _masked_ce(ParallelStudent.load(out / "student"), data)
    assert after < before - 0.3, (before, after)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert all(math.isfinite(r["ce_bits"]) and math.isfinite(r["soft_kl_bits"]) for r in rows)
    assert rows[0]["lr"] == pytest.approx(2e-3)                   # end of warmup
    assert 2e-4 < rows[-1]["lr"] < 2.1e-4                          # cosine down to min_lr_ratio * lr
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)


def test_sigkill_then_resume_equals_uninterrupted(audio_dir, shard_dir, tmp_path, capsys):
    """Masked-token steps and then on-policy steps (their draws seeded by the step, like the masks)."""
    steps, on_policy = 130, 20
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "distill.train",
                             *_argv(audio_dir, shard_dir, killed, steps, "--ckpt-every", "10", "--no-eval",
                                    "--on-policy-steps", str(on_policy))],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt, deadline = killed / "checkpoint.pt", time.time() + 60
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1].decode()
    assert proc.returncode == -signal.SIGKILL, err
    assert not (killed / "student").exists()
    at = torch.load(ckpt, weights_only=True)["step"]
    assert 10 <= at < steps
    # a different run is refused, naming the setting
    more = ("--no-eval", "--on-policy-steps", str(on_policy))
    assert train_main(_argv(audio_dir, shard_dir, killed, steps, "--resume", *more, "--lr", "5e-4")) == 1
    assert "lr: checkpoint 0.001 vs now 0.0005" in capsys.readouterr().err
    assert train_main(_argv(audio_dir, shard_dir, killed, steps, "--resume", *more)) == 0
    straight = tmp_path / "straight"
    assert train_main(_argv(audio_dir, shard_dir, straight, steps, *more)) == 0
    a, b = _weights(killed / "student"), _weights(straight / "student")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["resumed_from"] == at
    rows = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows]
    assert logged == sorted(set(logged)) and logged[-1] == steps + on_policy
    assert all(("div_bits" in r) == (r["step"] > steps) for r in rows)


def test_unreadable_checkpoint_is_named(audio_dir, shard_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    assert train_main(_argv(audio_dir, shard_dir, out, 2, "--resume", "--no-eval")) == 1
    err = capsys.readouterr().err
    assert "checkpoint.pt: not a readable training checkpoint" in err
    assert not (out / "student").exists()


def test_two_processes_end_with_identical_weights(audio_dir, shard_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # --multi_gpu picks the torch.distributed launcher; with --cpu the processes form a gloo group
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "distill.train", *_argv(audio_dir, shard_dir, out, 4, "--no-eval", "--cpu")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    d = summary["rank_weight_digests"]
    assert len(d) == 2 and d[0] == d[1]
    # the learning rate follows the step, whatever the number of processes
    from distill.train import lr_at
    cfg = DistillConfig(**summary["config"])
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4] and rows[0]["lr"] == pytest.approx(lr_at(3, cfg))
    # the ranks drew different batches, so equal weights mean synchronised gradients; and the
    # weights moved away from the teacher's copy
    from distill.student import ParallelStudent
    start = ParallelStudent.from_teacher(fj.load("tiny").prior(1)).state_dict()
    w = _weights(out / "student")
    assert any(not torch.equal(w[k], start[k]) for k in w)


# --- evaluation and bad input -----------------------------------------------------------------

def test_evaluate_writes_every_key(tiny, audio_dir, tmp_path):
    from distill.student import ParallelStudent
    ParallelStudent.from_teacher(tiny.prior(1)).save(tmp_path / "student")
    out = tmp_path / "eval"
    assert evaluate_main(["--student", str(tmp_path / "student"), "--model", "tiny", "--data", str(audio_dir),
                          "--windows", "6", "--passes", "4", "--batch-size", "3", "--c2st-steps", "5", "--out", str(out),
                          "--quiet"]) == 0
    r = json.loads((out / "eval.json").read_text())
    assert set(REQUIRED_KEYS) <= set(r) and set(r["settings"]) == {"scratch", "hopped"}
    for name, s in r["settings"].items():
        assert set(SETTING_KEYS) <= set(s), name
        for key in SETTING_KEYS:
            assert isinstance(s[key], (int, float)) and math.isfinite(s[key]), (name, key)
        assert s["passes_per_window_student"] == 4 and r["k"] == 4
        assert 0 <= s["c2st_accuracy"] <= 1 and 0 <= s["tv_mean"] <= 1 and 0 <= s["histogram_tv"] <= 1
        assert 0 < s["codebook_usage_student"] <= 64 and sum(s["histogram_student"]) == 6 * (64 - s["known"])
        assert s["teacher_nll_teacher"] < s["teacher_nll_real"]     # the teacher favours its own samples
    assert r["settings"]["scratch"]["known"] == 0 and r["settings"]["hopped"]["known"] == 32
    assert r["settings"]["scratch"]["passes_per_window_teacher"] == 64
    assert r["settings"]["hopped"]["passes_per_window_teacher"] < 64      # the known half is primed in chunks
    assert r["spectral_distance_ratio"] > 0
    assert "spectral distance ratio" in (out / "eval.md").read_text()
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_named(tiny, tmp_path, capsys):
    with pytest.raises(ValueError, match="--teacher"):
        DistillConfig(teacher="top")
    assert train_main(["--teacher", "middle", "--model", "tiny", "--real-ratio", "1.5"]) == 2
    assert "--real-ratio" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no audio files"):
        load_pieces(tmp_path / "empty", "train", 44100)
    short = [type("P", (), {"audio": np.ones(100, np.float32), "artist": 0, "genre": 0, "name": "p"})()]
    from distill.data import real_windows
    with pytest.raises(ValueError, match="long enough"):
        real_windows(tiny.vqvae, tiny.prior(1), short, 2, torch.Generator())
    with pytest.raises(ValueError, match="top-level"):
        real_windows(tiny.vqvae, tiny.prior(2), short, 2, torch.Generator())


# --- the student's unmasking noise ----------------------------------------------------------------

def test_noise_is_chosen_on_shard_windows_and_saved(audio_dir, shard_dir, tmp_path):
    from distill.student import ParallelStudent
    from distill.tune import TRAIN_GRID
    base = dict(teacher="middle", model="tiny", data=str(audio_dir), shards_dir=str(shard_dir), steps=10,
                shards=SHARDS, shard_size=SHARD_SIZE, k=K, gen_batch_size=5, batch_size=6, warmup=2,
                evaluate=False, progress=False, passes=4, tune_windows=6)
    result = train(DistillConfig(out=str(tmp_path / "tuned"), **base))
    tune = result["sampling_tune"]
    assert [{f: r[f] for f in TRAIN_GRID[0]} for r in tune["rows"]] == list(TRAIN_GRID) and tune["windows"] == 6
    assert all(math.isfinite(r["teacher_nll"]) and r["teacher_nll"] > 0 for r in tune["rows"])
    best = min(tune["rows"], key=lambda r: r["relative_gap"] + r["histogram_tv"])
    assert tune["known"] == 32                          # hopped windows: the student has the prefix layout
    saved = ParallelStudent.load(tmp_path / "tuned" / "student").sampling
    assert saved.temperature_anneal is False
    assert (saved.order, saved.confidence_noise, saved.temperature_scale) == \
        (best["order"], best["confidence_noise"], best["temperature_scale"])
    assert {r["order"] for r in tune["rows"]} == {"confidence", "spread"}
    assert len({r["temperature_scale"] for r in tune["rows"]}) > 1
    summary = json.loads((tmp_path / "tuned" / "train_summary.json").read_text())
    assert summary["sampling_tune"]["rows"] == tune["rows"]
    # a given value is kept as is, with no measurement
    result = train(DistillConfig(out=str(tmp_path / "fixed"), confidence_noise=5.0, **base))
    assert "sampling_tune" not in result
    assert ParallelStudent.load(tmp_path / "fixed" / "student").sampling.confidence_noise == 5.0
    with pytest.raises(ValueError, match="--confidence-noise"):
        DistillConfig(out=str(tmp_path / "bad"), confidence_noise=-1.0, **base)


def test_choose_sampling_picks_the_closest(tiny, shard_dir, monkeypatch):
    import distill.tune as tune
    from distill.student import ParallelStudent
    data = load_shards(shard_dir)
    prior = tiny.prior(1)
    student = ParallelStudent.from_teacher(prior)
    codes, upper, labels = data["codes"][:4], data["upper"][:4], data["labels"][:4] if "labels" in data else None
    # score every sample by the setting that made it: 2 + noise / 4 bits (+1 bit for the spread
    # order, -0.5 bit at temperature scale 0.5); the teacher's own: 3 bits
    made_with = []
    real_sample_windows = tune.sample_windows

    def fake_scores(prior_, z, *a, **k):
        if z is codes:
            return 3.0, 0.0
        s = made_with[-1]
        return 2.0 + s.confidence_noise / 4 + (s.order == "spread") - 0.5 * (s.temperature_scale == 0.5), 0.0

    def recording_sample_windows(sampler, *a, **k):
        made_with.append(sampler)
        return real_sample_windows(sampler, *a, **k)

    monkeypatch.setattr(tune, "teacher_scores", fake_scores)
    monkeypatch.setattr(tune, "histogram_tv", lambda a, b: 0.0)
    monkeypatch.setattr(tune, "sample_windows", recording_sample_windows)
    grid = tune.sampling_grid(noise=(0, 2, 4, 8), temperature_scale=(1.0,), orders=("confidence",))
    setting, report = tune.choose_sampling(prior, student, codes, upper, labels, passes=3, grid=grid)
    assert setting == {"order": "confidence", "confidence_noise": 4.0, "temperature_scale": 1.0}
    assert report["teacher_nll_teacher"] == 3.0
    assert [r["teacher_nll"] for r in report["rows"]] == [2.0, 2.5, 3.0, 4.0]
    # the spread order (no noise) and a sharper temperature are candidates of the full grid
    grid = tune.sampling_grid(noise=(0, 8), temperature_scale=(1.0, 0.5))
    setting, report = tune.choose_sampling(prior, student, codes, upper, labels, passes=3, grid=grid)
    assert len(report["rows"]) == 6 and {r["order"] for r in report["rows"]} == {"confidence", "spread"}
    assert all(r["confidence_noise"] == 0 for r in report["rows"] if r["order"] == "spread")
    assert setting == {"order": "spread", "confidence_noise": 0.0, "temperature_scale": 1.0}
    assert [(s.order, s.temperature_scale) for s in made_with[-6:]] == [(r["order"], r["temperature_scale"])
                                                                          for r in report["rows"]]
    for bad, match in (((), "grid is empty"), ([{"confidence_noise": 1.0}], "exactly the fields"),
                       ([{"order": "confidence", "confidence_noise": -1.0, "temperature_scale": 1.0}],
                        "confidence_noise")):
        with pytest.raises(ValueError, match=match):
            tune.choose_sampling(prior, student, codes, upper, labels, grid=bad)
    with pytest.raises(ValueError, match="teacher samples"):
        tune.choose_sampling(prior, student, codes[:3], upper, labels)
