"""Training a feature drafter (``distill.train_drafter``) on the tiny family: it learns, resumes, names bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.drafter import FeatureDrafter
from distill.train_drafter import main as drafter_main
from test_distill_train import audio_dir  # noqa: F401  (the fixture: fresh random tone files)

ROOT = Path(__file__).resolve().parents[1]


def _argv(audio_dir, out, steps, *extra, shards=None):
    return ["--teacher", "middle", "--model", "tiny", "--data", str(audio_dir), "--out", str(out),
            "--steps", str(steps), "--shards", "3", "--shard-size", "4", "--gen-batch-size", "4", "--batch-size", "4",
            "--starts", "8", "--unroll", "3", "--hidden", "32", "--warmup", "5", "--lr", "3e-3", "--no-progress",
            *(["--shards-dir", str(shards)] if shards else []), *extra]


@pytest.fixture(scope="module")
def trained(audio_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert drafter_main(_argv(audio_dir, out, 60, "--log-every", "5")) == 0
    return out


def test_the_drafter_learns_the_teacher(trained):
    log = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["kl"] < 0.7 * log[0]["kl"]
    assert log[-1]["accept_first"] > log[0]["accept_first"]
    summary = json.loads((trained / "train_summary.json").read_text())
    acceptance = summary["heldout_acceptance_by_depth"]
    assert len(acceptance) == 8 and all(0.0 < a <= 1.0 for a in acceptance)
    d = FeatureDrafter.load(trained / "drafter")
    assert d.config.level == 1 and d.config.hidden == 32
    assert (trained / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_a_plot_of_empty_panels_is_not_written(tmp_path):
    """``plot_metrics`` draws the drafter's curves from its own log keys; given a log without any key
    of a panel (the student's panels on a drafter log) it writes nothing."""
    from distill.train import STUDENT_PANELS, plot_metrics
    from distill.train_drafter import PLOT_PANELS
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(dict(step=s, loss=1.0 / s, kl=0.9 / s, accept_first=0.5, accept_last=0.4,
                                           lr=1e-3)) + "\n" for s in range(1, 6)))
    assert plot_metrics(log, tmp_path / "student.png", panels=STUDENT_PANELS) is None
    assert not (tmp_path / "student.png").exists()
    assert plot_metrics(log, tmp_path / "drafter.png", panels=PLOT_PANELS) == tmp_path / "drafter.png"
    assert (tmp_path / "drafter.png").read_bytes()[:4] == b"\x89PNG"


def test_sigkill_then_resume_equals_uninterrupted(audio_dir, trained, tmp_path):
    steps, shards = 150, trained / "shards"
    whole = tmp_path / "whole"
    assert drafter_main(_argv(audio_dir, whole, steps, shards=shards)) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "distill.train_drafter",
                             *_argv(audio_dir, killed, steps, "--ckpt-every", "10", shards=shards)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt, deadline = killed / "checkpoint.pt", time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1].decode()
    assert proc.returncode == -signal.SIGKILL, err
    assert not (killed / "drafter").exists()
    assert 10 <= torch.load(ckpt, weights_only=True)["step"] < steps
    assert drafter_main(_argv(audio_dir, killed, steps, "--ckpt-every", "10", "--resume", shards=shards)) == 0
    a, b = FeatureDrafter.load(whole / "drafter"), FeatureDrafter.load(killed / "drafter")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert drafter_main(_argv(audio_dir, killed, steps, shards=shards)) == 1        # no --resume: refused


@pytest.mark.parametrize("change,message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--depth", "-1"], "--depth must be >= 0"),
    (["--shards", "1"], "--shards must be >= 2"),
    (["--upper", "sampled"], "only --teacher bottom"),
    (["--model", "/nonexistent"], "not a model directory"),
])
def test_bad_input_is_named(audio_dir, tmp_path, capsys, change, message):
    argv = _argv(audio_dir, tmp_path / "r", 5)
    flag, value = change
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert drafter_main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
