"""The speed report runs end to end in --quick mode (tiny model) and writes its three files.

No timing assertions: the numbers depend on the machine. What is checked is the report's
structure, its arithmetic (end to end = sum of levels + decoding, ratios), resuming after an
interruption, and the errors for bad options.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from benchmarks import report
from benchmarks.report_cases import HOP_FRACTION, geometry, roofline_tokens_per_s

QUICK = ["--quick", "--batches", "1", "3", "--passes", "8", "16"]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert report.main(QUICK + ["--out-dir", str(out)]) == 0
    return out


def test_quick_report_writes_three_files(quick_report):
    files = sorted(p.name for p in quick_report.iterdir() if not p.name.startswith("."))
    stems = {p.rsplit(".", 1)[0] for p in files}
    assert len(stems) == 1 and stems.pop().startswith("cpu-")
    assert sorted(p.rsplit(".", 1)[1] for p in files) == ["json", "md", "png"]
    png = next(quick_report.glob("*.png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = next(quick_report.glob("*.md")).read_text()
    assert "end to end" in md and next(quick_report.glob("*.png")).name in md
    assert not list(quick_report.glob(".*partial*")), "the partial-results file is removed at the end"


def test_quick_report_json_schema(quick_report):
    rep = json.loads(next(quick_report.glob("*.json")).read_text())
    assert rep["schema"] == report.SCHEMA
    for key in ("date_utc", "command", "machine", "source", "settings", "subjects", "results", "summary",
                "speedups", "peers", "wall_seconds"):
        assert key in rep, key
    assert rep["settings"]["model"] == "tiny" and rep["settings"]["batches"] == [1, 3]
    (subj,) = rep["subjects"]
    assert sorted(subj["levels"]) == ["0", "1", "2"] and subj["untrained_students"] == [0, 1]
    kinds = {(r["kind"], r["sampler"], r["level"], r["passes"], r["batch"]) for r in rep["results"]}
    for b in (1, 3):
        for level in (0, 1, 2):
            assert ("ar", "ours", level, None, b) in kinds and ("ar", "original_style", level, None, b) in kinds
        for level in (0, 1):
            assert {("student", "parallel", level, k, b) for k in (8, 16)} <= kinds
        assert ("decode", "vqvae", None, None, b) in kinds
    for r in rep["results"]:
        assert len(r["seconds"]) == rep["settings"]["rounds"] and r["median_s"] > 0
        if r["kind"] in ("ar", "student", "decode"):
            assert r["s_per_minute"] > 0
        if r["kind"] == "ar":
            g = r["geometry"]
            assert r["passes_per_window"] == g["hop_tokens"] and r["n_new"] <= g["hop_tokens"]
            assert r["s_per_minute"] == pytest.approx(
                g["tokens_per_minute"] * r["batch"] / r["tokens_per_s"]
                + g["windows_per_minute"] * r["setup_s_per_window"])
        if r["kind"] == "student":
            assert r["passes_per_window"] == min(r["passes"], r["n_new"])
    samplers = {(s["sampler"], s["batch"]) for s in rep["summary"]}
    assert samplers == {(m, b) for m in ("original_style", "ours", "parallel_k8", "parallel_k16") for b in (1, 3)}
    for s in rep["summary"]:
        assert s["end_to_end"] == pytest.approx(sum(s["levels"].values()) + s["decode"])
    _check_peers(rep["peers"])


def _check_peers(peers):
    """The transformers port: measured when the peers extra is installed, else skipped with why."""
    assert peers and all(p["peer"] == "transformers" for p in peers)
    try:
        import transformers
        has_port = hasattr(transformers, "JukeboxModel")
    except ImportError:
        has_port = False
    if not has_port:
        assert [p["status"] for p in peers] == ["skipped"] and peers[0]["reason"]
        return
    assert "skipped" not in {p["status"] for p in peers}
    speed = [p for p in peers if p.get("case") == "speed"]
    assert sorted(p["batch"] for p in speed) == [1, 3]
    for p in speed:
        assert p["ours_tokens_per_s"] > 0 and p["port_tokens_per_s"] > 0
        assert p["ratio"] == pytest.approx(p["ours_tokens_per_s"] / p["port_tokens_per_s"], rel=0.02)
    (greedy,) = [p for p in peers if p.get("case") == "greedy tokens"]
    assert 0 <= greedy["agreement"] <= 1 and greedy["n_new"] > 0
    stated = [p for p in peers if p["status"] == "not compared"]
    assert len(stated) == 2 and all(p["reason"] for p in stated)


def test_summary_and_speedups_arithmetic():
    rng = random.Random(7)
    results = [{"subject": "x", "batch": 2, "kind": "decode", "sampler": "vqvae", "level": None, "passes": None,
                "s_per_minute": rng.uniform(1, 5)}]
    for level in (2, 1, 0):
        geo = {"windows_per_minute": rng.uniform(3, 30)}
        results.append({"subject": "x", "batch": 2, "kind": "setup", "sampler": "ours", "level": level,
                        "passes": None, "s_per_window": rng.uniform(0.1, 1)})
        for m in ("original_style", "ours"):
            results.append({"subject": "x", "batch": 2, "kind": "ar", "sampler": m, "level": level, "passes": None,
                            "geometry": geo, "sampling_s_per_minute": rng.uniform(10, 100)})
        if level < 2:
            results.append({"subject": "x", "batch": 2, "kind": "student", "sampler": "parallel", "level": level,
                            "passes": 5, "s_per_minute": rng.uniform(1, 10)})
    report.finish_ar(results)
    summary, speedups = report.summarise(results, [5])
    by = {s["sampler"]: s for s in summary}
    ar = {(r["sampler"], r["level"]): r for r in results if r["kind"] == "ar"}
    setup = {r["level"]: r["s_per_window"] for r in results if r["kind"] == "setup"}
    assert by["ours"]["levels"]["1"] == pytest.approx(
        ar["ours", 1]["sampling_s_per_minute"] + ar["ours", 1]["geometry"]["windows_per_minute"] * setup[1])
    st = {r["level"]: r["s_per_minute"] for r in results if r["kind"] == "student"}
    assert by["parallel_k5"]["levels"] == {"2": by["ours"]["levels"]["2"], "1": st[1], "0": st[0]}
    ratio = next(s for s in speedups if s["faster"] == "parallel_k5" and s["baseline"] == "original_style")
    assert ratio["ratios"]["end_to_end"] == pytest.approx(by["original_style"]["end_to_end"]
                                                          / by["parallel_k5"]["end_to_end"])
    assert ratio["ratios"]["0"] == pytest.approx(by["original_style"]["levels"]["0"] / st[0])


def test_geometry_and_roofline():
    import fastjukebox
    jb = fastjukebox.load("tiny")
    for level in jb.levels:
        c = jb.prior(level).config
        g = geometry(c, jb.vqvae.hop_lengths[level])
        assert g.tokens_per_minute == pytest.approx(60 * 44100 / jb.vqvae.hop_lengths[level])
        assert g.hop_tokens == int(HOP_FRACTION[level] * c.n_ctx) and g.known + g.hop_tokens == c.n_ctx
        assert g.windows_per_minute * g.hop_tokens == pytest.approx(g.tokens_per_minute)
    prior = jb.prior(0)
    r1, r7 = roofline_tokens_per_s(prior, 1, 1e12), roofline_tokens_per_s(prior, 7, 1e12)
    assert r1["weight_bytes"] == r7["weight_bytes"] > 0
    assert r7["cache_bytes"] == pytest.approx(7 * r1["cache_bytes"], rel=1e-6)
    assert r7["tokens_per_s"] == pytest.approx(7e12 / r7["bytes_per_step"])
    assert roofline_tokens_per_s(prior, 1, 2e12)["tokens_per_s"] == pytest.approx(2 * r1["tokens_per_s"])


def test_resumes_after_interruption(tmp_path, monkeypatch):
    real, calls, interrupted = report.run_job, [], []

    def flaky(job, *a, **kw):
        calls.append(job.key)
        if len(calls) == 5 and not interrupted:
            interrupted.append(job.key)
            raise KeyboardInterrupt
        return real(job, *a, **kw)

    monkeypatch.setattr(report, "run_job", flaky)
    argv = ["--quick", "--batches", "2", "--passes", "4", "--out-dir", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        report.main(argv)
    assert [p.name.startswith(".") for p in tmp_path.glob("*.json")] == [True], "only the partial results"
    first = list(calls)
    calls.clear()
    assert report.main(argv) == 0
    assert calls[0] == first[-1] and not set(calls) & set(first[:-1]), "finished measurements are reused"
    assert not list(tmp_path.glob(".*partial.json"))
    rep = json.loads(next(tmp_path.glob("cpu-*.json")).read_text())
    assert len(rep["results"]) == len(first) - 1 + len(calls)


@pytest.mark.parametrize("argv,message", [
    (["--batches", "0"], "--batches"),
    (["--passes", "-1"], "--passes"),
    (["--rounds", "0"], "positive"),
])
def test_bad_options(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        report.main(["--quick", "--out-dir", str(tmp_path)] + argv)
    assert message in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="cannot load model 'no-such-model'.*--model tiny"):
        report.main(["--quick", "--model", "no-such-model", "--out-dir", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_gpu_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit):
        report.main(["--device", "cuda", "--out-dir", str(tmp_path)])
    assert "no CUDA device" in capsys.readouterr().err
