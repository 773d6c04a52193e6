"""The benchmark entry point (``python -m benchmarks``) and its GPU runner on a CPU: one dry run of
``python -m benchmarks gpu`` writes every stage's results (kernel correctness, fast-path check,
attention and decode timings), the runner stops a stage at its budget, the GPU commands refuse
to run without CUDA, and the decode roofline counts the bytes a step moves."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu import decode_speed as dec_bench
from benchmarks.gpu.common import DRY_RUN_NOTE, NO_CUDA_EXIT, sanitize
from fastjukebox.attention import layer_patterns
from fastjukebox.config import PRESETS, PriorConfig
from fastjukebox.prior import Prior

ROOT = Path(__file__).resolve().parent.parent


def run_module(module: str, *args: str, cuda: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)      # the command must set it itself for a dry run
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def number_or_none(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and math.isfinite(x) and x > 0)


@pytest.fixture(scope="module")
def gpu_dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry-run")
    r = run_module("benchmarks", "gpu", "--dry-run", "--out-dir", str(out), timeout=1800)
    return r, out


def test_entry_point_lists_and_checks_commands():
    r = run_module("benchmarks", "--help")
    assert r.returncode == 0
    for command in ("sampling", "report", "gpu", "compile-check", "suite"):
        assert f"``{command}``" in r.stdout
    bad = run_module("benchmarks", "nope")
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr


def test_gpu_dry_run_runs_every_stage(gpu_dry_run):
    r, out = gpu_dry_run
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    doc = json.loads((out / "gpu-cpu-dry-run.json").read_text())
    assert [s["stage"] for s in doc["stages"]] == ["kernel_check", "fast_path_check", "decode_speed",
                                                   "attention_speed"]
    assert all(s["status"] == "done" and s["results"] for s in doc["stages"]), doc["stages"]
    assert DRY_RUN_NOTE in (out / "gpu-cpu-dry-run.md").read_text()


def test_kernel_check_dry_run(gpu_dry_run):
    _, out = gpu_dry_run
    doc = json.loads((out / "kernel-check-cpu-dry-run.json").read_text())
    assert doc["dry_run"] and doc["tolerance_rel_rms"]["float32"] == 1e-4
    rows = doc["rows"]
    assert {r["kernel"] for r in rows} == {"factored_attention", "decode_attention", "sample_logits"}
    patterns = {"block", "dense", "prev_block", "prime", "transpose", "cross"}
    assert {r["case"].split()[1] for r in rows if r["kernel"] == "factored_attention"} == patterns
    assert {r["case"].split()[1] for r in rows if r["kernel"] == "decode_attention"} == patterns
    for row in rows:
        assert row["ok"], row
        for name, err in row["errors"].items():
            assert err == 0 if name == "mismatched_ids" else 0 <= err < 1e-5
    assert {"o", "dq", "dk", "dv"} == set(next(r for r in rows if r["kernel"] == "factored_attention")["errors"])


def test_fast_path_check_dry_run(gpu_dry_run):
    _, out = gpu_dry_run
    doc = json.loads((out / "fast-path-check-cpu-dry-run.json").read_text())
    assert doc["passed"] and doc["graph_equals_eager"]
    assert doc["max_rel_fast_vs_ref_bf16"] <= doc["tol"]


def test_attention_speed_dry_run_writes_results(gpu_dry_run):
    _, out = gpu_dry_run
    doc = json.loads((out / "attention-speed-cpu-dry-run.json").read_text())
    md = (out / "attention-speed-cpu-dry-run.md").read_text()
    assert doc["device"] == "cpu-dry-run" and doc["dry_run"] is True and doc["note"] == DRY_RUN_NOTE
    assert DRY_RUN_NOTE in md
    # 2 toy shapes x (prev_block, dense causal, dense bidirectional) x 2 modes
    assert len(doc["rows"]) == 12
    seen = set()
    for row in doc["rows"]:
        assert row["op"] == "factored_attention" and row["mode"] in ("fwd", "fwd_bwd")
        assert row["pattern"] in ("prev_block", "dense")
        for key in ("head_dim", "n_ctx", "batch", "heads", "block_len"):
            assert isinstance(row[key], int) and row[key] > 0
        assert set(row["ms"]) == {"ours", "flex", "sdpa_dense", "xformers"}
        assert all(number_or_none(v) for v in row["ms"].values())
        assert row["ms"]["ours"] is not None and row["ms"]["sdpa_dense"] is not None
        for name in ("ours", "sdpa_dense"):      # checked against the reference, fp32: tight
            chk = row["checks"][name]
            assert chk["ok"] and max(chk["rel_rms"].values()) < 1e-5
            assert set(chk["rel_rms"]) == ({"o", "dq", "dk", "dv"} if row["mode"] == "fwd_bwd" else {"o"})
        for name, v in row["ms"].items():       # every implementation ran or says why not
            assert v is not None or row["errors"][name]
        seen.add((row["model"], row["pattern"], row["causal"], row["mode"]))
    assert len(seen) == 12
    # flex forward runs eagerly on the CPU and must agree with the reference too
    assert all(r_["checks"]["flex"]["ok"] for r_ in doc["rows"] if r_["mode"] == "fwd")
    assert md.count("\n| toy_") == 12 and "## fwd_bwd" in md

    again = run_module("benchmarks.gpu.attention_speed", "--dry-run", "--out-dir", str(out), "--patterns",
                       "prev_block", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "attention-speed-cpu-dry-run.json").read_text())["rows"] == doc["rows"]


def test_decode_speed_dry_run_writes_results(gpu_dry_run):
    _, out = gpu_dry_run
    doc = json.loads((out / "decode-speed-cpu-dry-run.json").read_text())
    md = (out / "decode-speed-cpu-dry-run.md").read_text()
    assert doc["device"] == "cpu-dry-run" and doc["dry_run"] is True and DRY_RUN_NOTE in md
    assert doc["copy_bandwidth_gbps"] > 0
    assert {(row["model"], row["batch"], row["attention"]) for row in doc["rows"]} == {
        ("toy_prior_1b_lyrics", 2, "triton"), ("toy_prior_1b_lyrics", 2, "reference")}
    for row in doc["rows"]:
        for key in ("tokens_per_s", "roofline_fraction", "roofline_tokens_per_s", "step_ms", "achieved_gbps"):
            assert number_or_none(row[key]) and row[key] is not None
        assert row["logits_finite"]
        assert math.isclose(row["roofline_fraction"], row["tokens_per_s"] / row["roofline_tokens_per_s"])
        b = row["bytes_per_step"]
        assert b["total"] == pytest.approx(b["weights"] + b["kv_read"] + b["kv_write"] + b["rows"])
    tri = next(row for row in doc["rows"] if row["attention"] == "triton")
    assert tri["logits_rel_rms_vs_reference"] < 1e-4     # fp32: the kernels compute the same step
    assert md.count("\n| toy_prior_1b_lyrics |") == 2


def test_budget_stops_a_stage_cleanly(tmp_path):
    r = run_module("benchmarks.gpu", "--dry-run", "--out-dir", str(tmp_path), "--budget-s", "20",
                   "--stages", "kernel_check")
    assert r.returncode == 0, r.stderr[-3000:]
    (stage,) = json.loads((tmp_path / "gpu-cpu-dry-run.json").read_text())["stages"]
    assert stage["status"].startswith("stopped at the budget") and stage["wall_s"] < 10


@pytest.mark.parametrize("module", ["benchmarks.gpu", "benchmarks.gpu.kernel_check", "benchmarks.gpu.attention_speed",
                                    "benchmarks.gpu.decode_speed"])
def test_refuses_without_cuda(module, tmp_path):
    r = run_module(module, "--out-dir", str(tmp_path), cuda=False)
    assert r.returncode == NO_CUDA_EXIT
    assert "no CUDA device" in r.stderr and "--dry-run" in r.stderr
    assert not any(tmp_path.iterdir())


SMALL = PriorConfig(level=0, n_ctx=64, width=16, depth=3, heads=2, attn_order=2, blocks=4, l_bins=32,
                    cond_width=8, cond_depth=1, y_bins=(3, 5), t_bins=8)


def test_roofline_bytes_hand_count():
    # width 16, n_state 4 (2 heads of 2), MLP 16, blocks of 16; layers: block, transpose, prev_block.
    per_layer = 2 * 2 * 16 + (16 * 12 + 12) + (4 * 16 + 16) + (16 * 16 + 16) + (16 * 16 + 16)   # = 892
    assert dec_bench.step_weight_elements(SMALL) == 3 * per_layer + 32 * 16                     # + x_out
    # Query at position 37: block 2, slot 5. Block layer reads slots 0..5 (6 keys), transpose its
    # column's blocks 0..2 (3), prev_block all of block 1 (16); each layer writes one key.
    assert dec_bench.step_kv_keys(SMALL, 37) == (6 + 3 + 16, 3)
    assert dec_bench.step_kv_keys(SMALL, 5) == (6 + 1 + 0, 3)          # block 0: no previous block
    b = dec_bench.step_bytes(SMALL, batch=3, positions=[37], item=2)
    assert b["weights"] == (3 * 892 + 512) * 2
    assert b["kv_read"] == 25 * 2 * 3 * 4 * 2       # keys x (k, v) x batch x n_state x bytes
    assert b["kv_write"] == 3 * 2 * 3 * 4 * 2
    assert b["rows"] == 3 * 2 * (3 * 16 + 32)       # token, position, conditioning rows in; logits out
    two = dec_bench.step_bytes(SMALL, batch=3, positions=[5, 37], item=2)
    assert two["kv_read"] == (7 + 25) / 2 * 2 * 3 * 4 * 2


def test_roofline_lyric_layers():
    # 1b_lyrics: prime layers read the lyric-visible keys; its dense layer reads everything so far.
    c = PRESETS["prior_1b_lyrics"]
    pats = layer_patterns(c.attn_order, c.depth)
    pos = c.n_lyric_prefix + 7 * c.n_ctx // 8
    blk, s0 = divmod(pos, c.block_len)
    want = {"block": s0 + 1, "transpose": blk + 1, "prev_block": c.block_len, "prime": c.prime_len, "dense": pos + 1}
    assert dec_bench.step_kv_keys(c, pos) == (sum(want[p] for p in pats), len(pats) - pats.count("prime"))
    # 5b_lyrics: cross layers read the encoder's keys and write none.
    c5 = PRESETS["prior_5b_lyrics"]
    pats5 = layer_patterns(c5.attn_order, c5.depth)
    reads, writes = dec_bench.step_kv_keys(c5, 100)
    assert writes == len(pats5) - pats5.count("cross")
    assert reads == sum({"block": 100 % 64 + 1, "transpose": 2, "prev_block": 64, "cross": 512}[p] for p in pats5)


@pytest.mark.parametrize("name", ["upsampler_level_0", "prior_1b_lyrics", "prior_5b", "prior_5b_lyrics"])
def test_step_weights_match_the_model(name):
    """The counted weights are the token transformer's parameters (cross layers' encoder
    projections excepted) plus the output projection, read off the built architecture."""
    with torch.device("meta"):
        prior = Prior(PRESETS[name])
    tm = prior.prior
    n = sum(p.numel() for k, p in tm.transformer.named_parameters() if "c_enc_kv" not in k)
    assert dec_bench.step_weight_elements(PRESETS[name]) == n + tm.x_out.weight.numel()


def test_sanitize_device_names():
    assert sanitize("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert sanitize("  A/B__c  ") == "a-b-c"
