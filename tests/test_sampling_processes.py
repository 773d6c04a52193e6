"""Sampling across processes: ``accelerate launch -m fastjukebox sample|upsample|continue`` with
two CPU processes (gloo) gives the codes of one process, token for token; a failing process names
itself and no codes file appears."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from fastjukebox.bundle import load
from fastjukebox.cli import main
from fastjukebox.cli_processes import share
from fastjukebox.sample_seeds import sample_seed

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--seconds", "0.1", "-q"]


def _codes(path) -> dict[int, np.ndarray]:
    with np.load(path) as f:
        return {int(k.removeprefix("codes_level")): f[k] for k in f.files if k.startswith("codes_level")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, *argv, script: Path | None = None) -> subprocess.CompletedProcess:
    """Two processes on the CPU (gloo) under accelerate launch."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    target = [str(script)] if script is not None else ["-m", "fastjukebox"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *target, *map(str, argv)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _failure(run: subprocess.CompletedProcess) -> str:
    """What the processes said, without the launcher's own traceback (which only says a child failed)."""
    child = run.stderr.split("Traceback (most recent call last):")[0]
    return f"exit {run.returncode}; the processes' stderr:\n{child[-3000:]}\n(launcher: {run.stderr[-600:]})"


def test_shares_are_contiguous_and_cover_the_run():
    for n in range(0, 7):
        for world in (1, 2, 3):
            parts = [share(n, world, r) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_per_sample_seeds_do_not_depend_on_the_batch():
    jb = load("tiny")
    kw = dict(seconds=0.1, artist=3, genre=4, levels=(2,), progress=False)
    together = jb.sample(n_samples=3, sample_seeds=[sample_seed(9, i) for i in range(3)], **kw)
    alone = [jb.sample(n_samples=1, sample_seeds=[sample_seed(9, i)], **kw) for i in range(3)]
    assert torch.equal(together.codes[2], torch.cat([a.codes[2] for a in alone]))
    assert not torch.equal(together.codes[2][0], together.codes[2][1])
    # sample 0 is seeded with the run's seed: a one-sample run draws what it always drew
    assert torch.equal(jb.sample(n_samples=1, seed=9, **kw).codes[2], alone[0].codes[2])
    # the device-position step takes the same per-sample generators, batched
    graph = jb.sample(n_samples=3, sample_seeds=[sample_seed(9, i) for i in range(3)], sampler="ar-graph", **kw)
    assert torch.equal(graph.codes[2], together.codes[2])


def test_two_processes_sample_and_continue_as_one(tmp_path):
    assert main(["sample", *TINY, "--n-samples", "3", "--seed", "5", "--out", str(tmp_path / "one.wav")]) == 0
    run = _launch(tmp_path, "sample", *TINY, "--n-samples", "3", "--seed", "5", "--out", tmp_path / "two.wav")
    assert run.returncode == 0, _failure(run)
    one, two = _codes(tmp_path / "one.npz"), _codes(tmp_path / "two.npz")
    assert sorted(two) == [0, 1, 2]
    for level in one:
        assert two[level].shape[0] == 3
        np.testing.assert_array_equal(two[level], one[level])
    for i in range(3):   # every sample's audio, written by the process that drew it (decoded in a
        # batch of another size, so the float arithmetic may round the last 16-bit step otherwise)
        a, _ = sf.read(tmp_path / f"two_{i}.wav", dtype="int16")
        b, _ = sf.read(tmp_path / f"one_{i}.wav", dtype="int16")
        assert a.shape == b.shape and np.abs(a.astype(int) - b).max() <= 1

    cont = ["continue", "--model", "tiny", "--codes", tmp_path / "one.npz", "--seconds", "0.15", "--levels", "2",
            "--seed", "4", "-q"]
    assert main([*map(str, cont), "--out", str(tmp_path / "c1.wav")]) == 0
    run = _launch(tmp_path, *cont, "--out", tmp_path / "c2.wav")
    assert run.returncode == 0, _failure(run)
    np.testing.assert_array_equal(_codes(tmp_path / "c2.npz")[2], _codes(tmp_path / "c1.npz")[2])


FAILING_RANK_1 = """\
import os, sys
from fastjukebox import bundle
if os.environ.get("RANK") == "1":
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")
    bundle.Jukebox.upsample = broken
from fastjukebox.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_failing_process_names_itself_and_no_codes_file_appears(tmp_path):
    assert main(["sample", *TINY, "--levels", "2", "--n-samples", "2", "--seed", "1",
                 "--out", str(tmp_path / "top.wav")]) == 0
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK_1)
    run = _launch(tmp_path, "upsample", "--model", "tiny", "--codes", tmp_path / "top.npz", "--seed", "2", "-q",
                  "--out", tmp_path / "up.wav", script=script)
    assert run.returncode != 0
    assert "process 1 of 2 (sample 1) failed: RuntimeError('injected failure')" in run.stderr
    assert "1 of 2 processes failed; no codes file written" in run.stderr
    assert not (tmp_path / "up.npz").exists()
    assert (tmp_path / "up_0.wav").exists()   # the healthy process's own sample


def test_processes_end_their_group_together_at_exit(tmp_path):
    # the last exit step of every process (registered before the group's end, so it runs after
    # it) finds the group destroyed, and the fast process gets there only after the slow one
    # reached its own exit
    script = tmp_path / "exit.py"
    script.write_text(
        "import atexit, time, torch\n"
        "def last():\n"
        "    open(f'after_{rank}', 'w').write(f'{torch.distributed.is_initialized()} {time.time()!r}')\n"
        "atexit.register(last)\n"
        "from fastjukebox.cli_processes import current\n"
        "rank = current().rank\n"
        "if rank == 1:\n"
        "    time.sleep(2.0)\n"
        "open(f'before_{rank}', 'w').write(repr(time.time()))\n")
    run = _launch(tmp_path, script=script)
    assert run.returncode == 0, _failure(run)
    before = {r: float((tmp_path / f"before_{r}").read_text()) for r in (0, 1)}
    after = {r: (tmp_path / f"after_{r}").read_text().split() for r in (0, 1)}
    assert [after[r][0] for r in (0, 1)] == ["False", "False"]
    assert float(after[0][1]) >= before[1] > before[0] + 1.5


def test_speculative_steps_in_every_process_when_the_runs_batch_reaches_its_crossover(tmp_path):
    """Three samples over two processes (shares of 2 and 1) with ``disable_at_batch=3``: each process
    is told the run's sample count, so the 1-sample share decodes token by token too, and the codes
    are the one-process run's (a share deciding by its own rows would speculate: other codes)."""
    argv = ["sample", "--model", "demo", "--seconds", "0.8", "-q", "--n-samples", "3", "--seed", "5",
            "--sampler", "1=speculative,0=speculative", "--sampler-opt", "disable_at_batch=3"]
    assert main([*argv, "--out", str(tmp_path / "one.wav")]) == 0
    run = _launch(tmp_path, *argv, "--out", tmp_path / "two.wav")
    assert run.returncode == 0, _failure(run)
    one, two = _codes(tmp_path / "one.npz"), _codes(tmp_path / "two.npz")
    for level in (0, 1):
        np.testing.assert_array_equal(two[level], one[level])
