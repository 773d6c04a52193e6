"""The ahead-of-time compile check: what it enumerates, what it fails, and real compilations for sm_90
(in a subprocess: this suite imports Triton in interpreter mode)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastjukebox.attention import layer_patterns
from fastjukebox.config import PRESETS
from kernels.compile_check import BACKWARD_SPILL_BUDGET, SHARED_LIMIT, CheckResult, failures_of
from kernels.variants import KERNELS, _features, released_variants, representative_subset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def variants():
    return released_variants(90)


def test_every_kernel_pattern_and_dtype_is_enumerated(variants):
    assert {v.kernel for v in variants} == set(KERNELS)
    for name in ("upsampler_level_0", "prior_1b_lyrics", "prior_5b", "prior_5b_lyrics"):
        c = PRESETS[name]
        used = {u.split()[1] for v in variants for u in v.uses if u.startswith(name + " ")}
        assert set(layer_patterns(c.attn_order, c.depth)) <= used
    assert any(u.startswith("prior_5b_lyrics.lyric_encoder") for v in variants for u in v.uses)
    for kernel in ("attn_fwd_kernel", "decode_attention_kernel", "sample_logits_kernel"):
        assert {v.dtype for v in variants if v.kernel == kernel} >= {"bf16", "fp16"}
    # fp32 only where auto sends it to the kernels (head dim <= 128): the lyric encoder's 80
    assert {v.constexprs["D"] for v in variants if v.dtype == "fp32" and "D" in v.constexprs} == {80}
    steps = [v for v in variants if v.kernel == "decode_attention_kernel"]
    assert {v.constexprs["POS_FROM_PTR"] for v in steps} == {True, False}     # graph step and eager
    assert {v.constexprs["SPLIT"] for v in steps} == {True, False}
    assert len({v.key for v in variants}) == len(variants)                   # distinct binaries


def test_signature_types_every_argument(variants):
    for v in variants:
        sig = v.signature()
        assert list(sig) == KERNELS[v.kernel].arg_names
        assert {a for a, t in sig.items() if t == "constexpr"} == set(v.constexprs)


def test_representative_subset_covers_every_feature(variants):
    sub = representative_subset(variants)
    assert len(sub) < len(variants) / 4
    assert set().union(*map(_features, sub)) == set().union(*map(_features, variants))


def _result(kernel="attn_fwd_kernel", shared=1024, spill=0, arch=90, error=None):
    return CheckResult(variant="v", kernel=kernel, dtype="bf16", arch=arch, num_warps=4, num_stages=2,
                       constexprs={}, uses=[], compile_s=0.1, shared_bytes=shared, registers=128,
                       spill_store_bytes=spill, spill_load_bytes=spill, stack_bytes=spill, error=error)


def test_failure_rules():
    assert failures_of(_result(), backward=False) == []
    assert "shared memory" in failures_of(_result(shared=SHARED_LIMIT[80] + 1, arch=80), backward=False)[0]
    assert failures_of(_result(shared=SHARED_LIMIT[80] + 1, arch=90), backward=False) == []
    assert "must not spill" in failures_of(_result(spill=4), backward=False)[0]
    assert failures_of(_result(spill=BACKWARD_SPILL_BUDGET), backward=True) == []
    assert "budget" in failures_of(_result(spill=BACKWARD_SPILL_BUDGET + 4), backward=True)[0]
    assert "compile error" in failures_of(_result(error="CompilationError: at 19:43"), backward=False)[0]


PROBE = r"""
import json, sys
from kernels.compile_check import compile_variant, _fresh_cache
from kernels.variants import Variant, released_variants, representative_subset
_fresh_cache()
vs = representative_subset(released_variants(90))
picked = {}
for v in vs:   # the first representative of each kernel
    picked.setdefault(v.kernel, v)
fwd = dict(H=1, D=256, CAUSAL=True, PATTERN=0, INPUT_PRECISION="ieee", BLOCK_D=256)
extra = {"spilling": Variant("attn_fwd_kernel", "bf16", {**fwd, "D": 150, "BT": 64, "BS": 32}, num_warps=8,
                            num_stages=3)}
kinds = sys.argv[1].split(",")
todo = {**{k: v for k, v in picked.items() if k in kinds}, **{k: v for k, v in extra.items() if k in kinds}}
out = {}
for name, v in todo.items():
    r = compile_variant(v, 90)
    out[name] = dict(failures=r.failures, registers=r.registers, shared=r.shared_bytes, spills=r.spill_store_bytes)
print(json.dumps(out))
"""


def _compile(kinds: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", PROBE, ",".join(kinds)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_real_compilations_pass_and_a_spilling_tile_fails():
    """One released variant of the sampling and decode kernels compiles for sm_90 within the limits;
    the old 5b forward tile (BT 64 at head dim 150) fails on spills. (Shared memory above the limit
    is checked by ``test_failure_rules``: Triton lowers the pipeline depth to fit the target.)"""
    out = _compile(["sample_logits_kernel", "decode_attention_kernel", "spilling"])
    for name in ("sample_logits_kernel", "decode_attention_kernel"):
        assert out[name]["failures"] == [], out[name]
        assert 0 < out[name]["registers"] <= 255
    assert any("must not spill" in f for f in out["spilling"]["failures"]), out["spilling"]


def test_the_kernels_shape_table_matches_the_released_presets():
    """``kernels.variants.MODELS`` is written out (the kernels import nothing of the project):
    it must hold what the presets and their layer patterns give."""
    from fastjukebox.attention import layer_patterns
    from fastjukebox.config import PRESETS
    from kernels.variants import MODELS, Model
    expect = []
    for name in ("upsampler_level_0", "prior_1b_lyrics", "prior_5b", "prior_5b_lyrics"):
        c = PRESETS[name]
        expect.append(Model(name, c.seq_len, c.head_dim, c.heads, c.block_len,
                            tuple(sorted(set(layer_patterns(c.attn_order, c.depth)))), c.prime_len, c.encoder_len,
                            c.bins, True))
        if c.lyrics == "encoder":
            expect.append(Model(f"{name}.lyric_encoder", c.n_tokens,
                                int(c.prime_width * c.prime_m_attn) // c.prime_heads, c.prime_heads,
                                c.n_tokens // (c.prime_blocks or 1),
                                tuple(sorted(set(layer_patterns(c.prime_attn_order, c.prime_depth)))), None, 0,
                                c.bins, False))
    assert MODELS == tuple(expect)


def test_the_kernels_priming_chunk_is_the_default_chunk_size():
    """``kernels.variants.PRIMING_CHUNK`` is written out too: the chunk sampling primes with unless
    told otherwise (``fastjukebox.settings.DEFAULT_CHUNK_SIZE``)."""
    from fastjukebox.settings import DEFAULT_CHUNK_SIZE
    from kernels.variants import PRIMING_CHUNK
    assert PRIMING_CHUNK == DEFAULT_CHUNK_SIZE
