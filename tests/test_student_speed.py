"""benchmarks.student_speed (on the tiny family, so it cannot rot) and the labelled projection."""
import json

import pytest

from benchmarks.student_projection import H100, _model, projection
from benchmarks.student_speed import main
from fastjukebox.config import PRESETS


def test_speed_report_on_the_tiny_family(tmp_path):
    import fastjukebox as fj
    from distill.student import ParallelStudent
    jb = fj.load("tiny")
    students = tmp_path / "students"
    ParallelStudent.from_teacher(jb.prior(1)).save(students / "student_level_1")
    out = tmp_path / "speed"
    assert main(["--model", "tiny", "--students", str(students), "--levels", "1", "--passes", "1,2",
                 "--batches", "1,2", "--rounds", "1", "--out", str(out), "--quiet"]) == 0
    r = json.loads(out.with_suffix(".json").read_text())
    n_ctx = jb.prior(1).config.n_ctx
    kinds = {(x["batch"], x["window"], x["sampler"], x["passes"], x.get("prefix_cache")) for x in r["results"]}
    for b in (1, 2):
        assert (b, "first", "ar", n_ctx, None) in kinds and (b, "hopped", "ar", n_ctx // 2, None) in kinds
        for K in (1, 2):
            assert (b, "first", "student", K, False) in kinds
            assert (b, "hopped", "student", K, True) in kinds and (b, "hopped", "student", K, False) in kinds
    rows = [s for s in r["summary"] if s["sampler"] == "exact AR"]
    assert len(rows) == 2 and all(s["speedup_hopped"] == 1.0 for s in rows)
    for s in r["summary"]:
        assert s["s_per_minute"] == pytest.approx(s["first_s"] + s["hopped_windows_per_minute"] * s["hopped_s"])
    md = out.with_suffix(".md").read_text()
    assert "Projection (not measured)" in md and "student K=2, prefix cache" in md


def test_projection_against_hand_numbers():
    """The H100 projection of the released level-0 upsampler against numbers worked by hand:
    72 layers of width 1920 hold about 8.0e8 weights, 1.6 GB in bf16, so a batch-1 AR step that
    reads them once from 3.35 TB/s of HBM takes about 0.48 ms; at batch 16 the step is still
    memory-bound (16 x 1.6 GFLOP = 26 GFLOP take 26 us at 989 TFLOP/s), so it costs barely more.
    A hopped window's student work is 4096 new positions x about 1.6 GFLOP per pass at half of
    peak: 13 ms per pass at batch 1, and the known half runs once besides the K passes."""
    c = PRESETS["upsampler_level_0"]
    m = _model(c)
    assert 7.9e8 < m["weights"] < 8.1e8 and m["weight_bytes"] == 2 * m["weights"]
    p = projection(batches=(1, 16), passes=(2, 4))
    one, sixteen = p["rows"]
    assert 0.47e-3 < one["ar_step_s"] < 0.50e-3
    assert one["ar_step_s"] < sixteen["ar_step_s"] < 1.2 * one["ar_step_s"]
    per_pass = 4096 * 1.61e9 / (0.5 * 989e12)                         # 13.3 ms
    assert one["student"][2]["hopped_s"] == pytest.approx(3 * per_pass, rel=0.01)
    assert one["student"][4]["hopped_s"] == pytest.approx(5 * per_pass, rel=0.01)
    assert sixteen["student"][2]["hopped_s"] == pytest.approx(16 * one["student"][2]["hopped_s"], rel=0.01)
    assert p["kind"].startswith("projection")
