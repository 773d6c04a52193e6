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


def test_projection_follows_its_formula():
    c = PRESETS["upsampler_level_0"]
    m = _model(c)
    assert 7.9e8 < m["weights"] < 8.1e8           # 72 layers of width 1920 (the conditioner is left out)
    p = projection(batches=(1,), passes=(2,))
    row = p["rows"][0]
    step = max(m["weight_bytes"] + m["kv_bytes"], 0) / H100.hbm_bandwidth
    assert row["ar_step_s"] == pytest.approx(max(step, m["flops_ar"] / H100.peak_flops))
    assert row["ar_step_s"] == pytest.approx(step)  # batch 1: bound by memory
    pass_half = 4096 * m["flops_student"] / (H100.achieved_fraction * H100.peak_flops)
    assert row["student"][2]["hopped_s"] == pytest.approx(3 * pass_half)    # prefix once + 2 passes
    assert p["kind"].startswith("projection")
