"""The pass-count rule of ``distill.tune.choose_passes``: the smallest K whose chosen setting keeps
the teacher NLL within the gap and the codebook usage above the share, on training windows."""
import pytest

import distill.tune as tune


WORSE = {"order": "confidence", "confidence_noise": 2.0, "temperature_scale": 1.0}
BEST = {"order": "spread", "confidence_noise": 0.0, "temperature_scale": 0.85}


def _fake(results):
    """A stand-in for ``choose_sampling``: per pass count, (relative gap, codes used)."""
    calls = []

    def choose(prior, student, codes, upper, labels, *, passes, **kw):
        calls.append(passes)
        gap, used = results[passes]
        rows = [{**WORSE, "relative_gap": gap + 0.1, "histogram_tv": 0.1, "score": gap + 0.2, "codes_used": used},
                {**BEST, "relative_gap": gap, "histogram_tv": 0.1, "score": gap + 0.1, "codes_used": used}]
        return dict(BEST), {"passes": passes, "rows": rows, "codes_used_teacher": 100, "teacher_nll_teacher": 3.0}
    return choose, calls


@pytest.mark.parametrize("results,expect,tried", [
    ({1: (0.20, 100), 2: (0.04, 99), 4: (0.01, 100)}, 2, [1, 2]),       # 2 is the first that meets it
    ({1: (0.01, 90), 2: (0.03, 96), 4: (0.01, 100)}, 2, [1, 2]),        # K=1 uses too few codes
    ({1: (0.30, 100), 2: (0.20, 100), 4: (0.06, 100)}, 4, [1, 2, 4]),   # none meets: the most passes
    ({1: (0.05, 95), 2: (0.0, 100), 4: (0.0, 100)}, 1, [1]),            # the bounds are inclusive
])
def test_smallest_pass_count_meeting_the_rule(monkeypatch, results, expect, tried):
    choose, calls = _fake(results)
    monkeypatch.setattr(tune, "choose_sampling", choose)
    monkeypatch.setattr(tune, "teacher_reference", lambda *a: (3.0, [], 100))
    passes, setting, report = tune.choose_passes(None, None, None, None, None, candidates=(4, 1, 2))
    assert (passes, setting) == (expect, BEST)
    assert calls == tried
    assert [r["meets"] for r in report["by_passes"]][-1] == (results[expect][0] <= 0.05)


def test_bad_candidates_are_named():
    with pytest.raises(ValueError, match="pass-count candidates"):
        tune.choose_passes(None, None, None, None, None, candidates=(0, 2))
    with pytest.raises(ValueError, match="pass-count candidates"):
        tune.choose_passes(None, None, None, None, None, candidates=())


def test_cli_names_a_student_of_another_level(tmp_path, capsys):
    from fastjukebox.bundle import ASSETS
    assert tune.main(["--teacher", "bottom", "--student", str(ASSETS / "demo" / "student_level_1"),
                      "--shards", str(tmp_path), "--out", str(tmp_path / "tune.json")]) == 2
    assert "level-1 student; --teacher bottom is level 0" in capsys.readouterr().err
