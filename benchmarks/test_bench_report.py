"""Speed of the parallel student (K = 8 and 16 passes per window) and of VQ-VAE decoding.

``pytest benchmarks --benchmark-only`` times one whole level-0 window of
``distill.sampler.ParallelWindowSampler`` (steady state: ``n_ctx - hop`` codes known, ``hop``
filled) and the decoding of level-0 codes, at batch 1 and 16, with the same runners as
``python -m benchmarks.report``. The model is the bundled ``demo`` family when present, else
``tiny`` (``FASTJUKEBOX_BENCH_MODEL`` overrides); students missing from the bundle are built
untrained from the teacher (speed does not depend on the weights). CUDA cases run when a GPU is
present.
"""
from __future__ import annotations

import os

import pytest
import torch

from .report_cases import decode_runner, geometry, student_runner

BATCHES = (1, 16)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DECODE_SECONDS = 0.5


def _model_name() -> str:
    name = os.environ.get("FASTJUKEBOX_BENCH_MODEL")
    if name:
        return name
    from fastjukebox.bundle import ASSETS
    return "demo" if (ASSETS / "demo").is_dir() else "tiny"


@pytest.fixture(scope="module", params=DEVICES)
def subject(request):
    from .report import load_bundle
    device = request.param
    return load_bundle(_model_name(), device, torch.bfloat16 if device == "cuda" else torch.float32), device


def _record(benchmark, **info):
    benchmark.extra_info.update(model=_model_name(), threads=torch.get_num_threads(), **info)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("passes", [8, 16])
def test_student_window_speed(benchmark, subject, passes, batch):
    sub, device = subject
    student = sub.students[0]
    g = geometry(student.config, sub.vqvae.hop_lengths[0])
    prepare = student_runner(student, passes, batch, g.known, g.hop_tokens)
    benchmark.group = f"parallel student, level-0 window, batch {batch}, {device}"
    _record(benchmark, passes=min(passes, g.hop_tokens), batch=batch, known=g.known, n_new=g.hop_tokens,
            device=device, untrained=0 in sub.untrained_students)

    def run(fn):
        out = fn()
        _sync(device)
        return out
    codes = benchmark.pedantic(run, setup=lambda: ((prepare(),), {}), rounds=2, iterations=1, warmup_rounds=1)
    assert codes.shape == (batch, g.known + g.hop_tokens)
    assert int(codes.min()) >= 0 and int(codes.max()) < student.config.l_bins


@pytest.mark.parametrize("batch", BATCHES)
def test_vqvae_decode_speed(benchmark, subject, batch):
    sub, device = subject
    vq = sub.vqvae
    n_codes = max(1, int(DECODE_SECONDS * vq.config.sr / vq.hop_lengths[0]))
    prepare = decode_runner(vq, batch, n_codes)
    benchmark.group = f"VQ-VAE decode level 0, {n_codes * vq.hop_lengths[0]} samples, batch {batch}, {device}"
    _record(benchmark, batch=batch, codes=n_codes, device=device)

    def run(fn):
        out = fn()
        _sync(device)
        return out
    audio = benchmark.pedantic(run, setup=lambda: ((prepare(),), {}), rounds=2, iterations=1, warmup_rounds=1)
    assert audio.shape == (batch, n_codes * vq.hop_lengths[0])
    assert torch.isfinite(audio).all()
