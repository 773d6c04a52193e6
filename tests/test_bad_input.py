"""Bad input, named before any sampling: one table per command line and one for the API.

Each row is a bad input and the text its error must contain. Command lines exit with status 2
and one ``error:`` line on stderr (no traceback) and leave no output behind; the API raises a
``ValueError`` subclass (``SettingsError``, ``CheckpointError``, ...). The errors fire before
any model work, so the whole table runs in seconds on the bundled tiny and demo families.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fastjukebox as fj
from fastjukebox import cli
from fastjukebox.bundle import ASSETS
from fastjukebox.checkpoint import CheckpointError
from fastjukebox.settings import MAX_SECONDS, SettingsError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the rows refer to as {d}/..."""
    d = tmp_path_factory.mktemp("bad")
    (d / "dir.wav").mkdir()                     # an --out that is a directory
    (d / "side.npz").mkdir()                    # a directory where the .npz sidecar goes
    (d / "side_plot.png").mkdir()               # ... and where --plot's PNG goes
    (d / "afile").write_text("not a directory")  # a parent that is a file
    (d / "dir.npz").mkdir()
    top = np.random.default_rng(0).integers(0, 16, (1, 8))
    np.savez(d / "float.npz", codes_level2=top.astype(np.float32))
    np.savez(d / "bool.npz", codes_level2=np.ones((1, 8), dtype=bool))
    np.savez(d / "top.npz", codes_level2=top, settings=np.array("{}"))
    for name, mutate in (("list", lambda c: []), ("missing", lambda c: {"kind": "prior"}),
                         ("width", lambda c: {**c, "width": "abc"})):
        m = d / f"model_{name}"
        shutil.copytree(ASSETS / "tiny", m)
        cfg = m / "prior_level_1" / "config.json"
        cfg.write_text(json.dumps(mutate(json.loads(cfg.read_text()))))
    (d / "shards_bad").mkdir()
    (d / "shards_bad" / "meta.json").write_text("{truncated")
    m = d / "model_sampling"
    shutil.copytree(ASSETS / "tiny", m)
    (m / "sampling.json").write_text(json.dumps({"temperature": "hot"}))
    m = d / "student_sampling"
    shutil.copytree(ASSETS / "demo" / "student_level_1", m)
    (m / "sampling.json").write_text(json.dumps({"passes": 0}))
    m = d / "student_bad"
    shutil.copytree(ASSETS / "demo" / "student_level_1", m)
    cfg = m / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "depth": "two"}))
    return d


def _cli(capsys, argv, files, main=cli.main) -> tuple[int, str]:
    before = {p.name for p in files.iterdir()}
    try:
        rc = main([a.format(d=files) for a in argv])
    except SystemExit as e:            # argparse: bad option values
        rc = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert {p.name for p in files.iterdir()} == before, "a bad input left output behind"
    return rc, err


def _one_error_line(err: str, message: str) -> None:
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, err
    assert message in lines[0], err


TINY = ["--model", "tiny", "-q", "--seed", "0"]
SAMPLE = ["sample", *TINY, "--seconds", "0.1", "--out", "{d}/o.wav"]
UPSAMPLE = ["upsample", *TINY, "--codes", "{d}/top.npz", "--out", "{d}/o.wav"]
EXCERPT = ["upsample", "--model", "demo", "-q", "--from-audio", "demo:organ", "--seconds", "2"]


@pytest.mark.parametrize("argv, message", [
    # silent wrong results before
    (SAMPLE + ["--temperature", "nan"], "'nan' is not a finite number >= 0"),
    (SAMPLE + ["--temperature", "-0.5"], "'-0.5' is not a finite number >= 0"),
    (SAMPLE + ["--temperature", "inf"], "'inf' is not a finite number >= 0"),
    (SAMPLE + ["--temperature", "2=0.9,1=nan"], "'nan' is not a finite number >= 0"),
    (SAMPLE + ["--top-p", "1.5"], "'1.5' is not a number in [0, 1]"),
    (SAMPLE + ["--sampler", "3=parallel"], "sampler names level(s) 3, which this call does not sample; "
                                           "it samples level(s) 2, 1, 0"),
    (SAMPLE + ["--levels", "2", "--top-k", "1=5"], "top_k names level(s) 1, which this call does not sample; "
                                                     "it samples level(s) 2"),
    (SAMPLE + ["--levels", "3"], "this model has priors for level(s) 2, 1, 0, not 3"),
    # a hang and an overflow before
    (SAMPLE + ["--seconds", "1e9"], f"the length must be at most {MAX_SECONDS:g}"),
    (SAMPLE + ["--seconds", "1e300"], f"the length must be at most {MAX_SECONDS:g}"),
    (SAMPLE + ["--seconds", "nan"], "the length must be a finite number > 0"),
    (SAMPLE + ["--n-samples", "0"], "expected an integer >= 1"),
    (SAMPLE + ["--total-seconds", "inf"], "the length must be a finite number > 0"),
    # work lost after sampling before
    (SAMPLE + ["--out", "{d}/dir.wav"], "--out '{d}/dir.wav' is a directory"),
    (SAMPLE + ["--out", "{d}/afile/x.wav"], "'{d}/afile' is a file, not a directory"),
    (SAMPLE + ["--out", "{d}/side.wav"], "output '{d}/side.npz' is a directory"),
    (SAMPLE + ["--n-samples", "2", "--out", "{d}/dir.wav"], "output '{d}/dir.npz' is a directory"),
    # tracebacks before
    (SAMPLE + ["--device", "tpu"], "unknown device 'tpu'"),
    (SAMPLE + ["--model", ""], "--model is empty"),
    (SAMPLE + ["--model", "{d}/model_list"], "model_list/prior_level_1/config.json: expected a JSON object, got list"),
    (SAMPLE + ["--model", "{d}/model_missing"], "model_missing/prior_level_1/config.json: field 'level' is missing"),
    (SAMPLE + ["--model", "{d}/model_width"], "model_width/prior_level_1/config.json: field 'width' must be an "
                                              "integer, got 'abc'"),
])
def test_sample_bad_input(files, capsys, argv, message):
    rc, err = _cli(capsys, argv, files)
    assert rc == 2
    _one_error_line(err, message.format(d=files))


@pytest.mark.parametrize("argv, message", [
    (EXCERPT + ["--sampler", "3=parallel", "--out", "{d}/o.wav"],
     "sampler names level(s) 3, which this call does not sample; it samples level(s) 1, 0"),
    (EXCERPT + ["--temperature", "2=0.5", "--out", "{d}/o.wav"], "temperature names level(s) 2"),
    (EXCERPT + ["--out", "{d}/side.wav", "--plot"], "output '{d}/side.npz' is a directory"),
    (UPSAMPLE[:-2] + ["--out", "{d}/side_plot.wav", "--plot"], "output '{d}/side_plot.png' is a directory"),
    (UPSAMPLE[:-4] + ["--codes", "{d}/float.npz", "--out", "{d}/o.wav"], "must be integer codes"),
    (UPSAMPLE[:-4] + ["--codes", "{d}/bool.npz", "--out", "{d}/o.wav"], "must be integer codes"),
    (UPSAMPLE + ["--temperature", "1=-1"], "'-1' is not a finite number >= 0"),
    (UPSAMPLE + ["--device", "tpu"], "unknown device 'tpu'"),
    (UPSAMPLE[:-2] + ["--out", "{d}/dir.wav"], "is a directory"),
])
def test_upsample_bad_input(files, capsys, argv, message):
    rc, err = _cli(capsys, argv, files)
    assert rc == 2
    _one_error_line(err, message.format(d=files))


CONTINUE = ["continue", *TINY, "--codes", "{d}/top.npz"]


@pytest.mark.parametrize("argv, message", [
    (CONTINUE + ["--seconds", "1e9", "--out", "{d}/o.wav"], f"must be at most {MAX_SECONDS:g}"),
    (CONTINUE + ["--seconds", "0.1", "--out", "{d}/dir.wav"], "is a directory"),
    (CONTINUE + ["--seconds", "0.1", "--levels", "2", "--sampler", "1=ar", "--out", "{d}/o.wav"],
     "sampler names level(s) 1, which this call does not sample; it samples level(s) 2"),
    (CONTINUE + ["--seconds", "0.1", "--temperature", "nan", "--out", "{d}/o.wav"], "is not a finite number"),
])
def test_continue_bad_input(files, capsys, argv, message):
    rc, err = _cli(capsys, argv, files)
    assert rc == 2
    _one_error_line(err, message.format(d=files))


@pytest.mark.parametrize("argv, message", [
    (["encode", "--model", "tiny", "x.wav", "--out", "{d}/dir.npz"], "--out '{d}/dir.npz' is a directory"),
    (["encode", "--model", "tiny", "x.wav", "--out", "{d}/afile/c.npz"], "'{d}/afile' is a file, not a directory"),
    (["encode", "--model", "tiny", "x.wav", "--seconds", "nan", "--out", "{d}/c.npz"], "finite number > 0"),
    (["encode", "--model", "tiny", "x.wav", "--device", "tpu", "--out", "{d}/c.npz"], "unknown device 'tpu'"),
])
def test_encode_bad_input(files, capsys, argv, message):
    rc, err = _cli(capsys, argv, files)
    assert rc == 2
    _one_error_line(err, message.format(d=files))


@pytest.mark.parametrize("argv, message", [
    (["decode", "--model", "tiny", "--codes", "{d}/top.npz", "--out", "{d}/dir.wav"], "is a directory"),
    (["decode", "--model", "tiny", "--codes", "{d}/top.npz", "--level", "-1", "--out", "{d}/o.wav"],
     "expected an integer >= 0"),
    (["decode", "--model", "tiny", "--codes", "{d}/float.npz", "--out", "{d}/o.wav"], "must be integer codes"),
    (["decode", "--model", "{d}/model_sampling", "--codes", "{d}/top.npz", "--out", "{d}/o.wav"],
     "model_sampling/sampling.json: field 'temperature', level 0: temperature must be a finite number >= 0"),
])
def test_decode_bad_input(files, capsys, argv, message):
    rc, err = _cli(capsys, argv, files)
    assert rc == 2
    _one_error_line(err, message.format(d=files))


@pytest.mark.parametrize("argv, message", [
    (["info", "{d}/model_width"], "field 'width' must be an integer"),
    (["info", "{d}/model_list/prior_level_1"], "expected a JSON object, got list"),
    (["info", "{d}/model_sampling"], "sampling.json: field 'temperature'"),
    (["info", "{d}/student_sampling"], "student_sampling holds a 'student' component, expected 'prior'"),
])
def test_info_bad_input(files, capsys, argv, message):
    rc, err = _cli(capsys, argv, files)
    assert rc == 2
    _one_error_line(err, message.format(d=files))


@pytest.mark.parametrize("argv, message", [
    (["convert", "{d}/model_missing/prior_level_1", "{d}/converted"], "field 'level' is missing"),
    (["convert", "{d}/model_width", "{d}/converted"], "field 'width' must be an integer"),
    (["convert", "{d}/no_such_file.pth.tar", "{d}/converted"], "no such checkpoint file"),
])
def test_convert_bad_input(files, capsys, argv, message):
    rc, err = _cli(capsys, argv, files)
    assert rc == 2
    _one_error_line(err, message.format(d=files))


@pytest.mark.parametrize("argv, message", [
    (["--teacher", "middle", "--model", "no_such_model", "--out", "{d}/run"], "not a model directory"),
    (["--teacher", "middle", "--data", "{d}/no_audio_here", "--out", "{d}/run"], "not a directory"),
    (["--teacher", "middle", "--init-student", "{d}/student_bad", "--out", "{d}/run"],
     "student_bad/config.json: field 'depth' must be an integer"),
    (["--teacher", "middle", "--out", "{d}/afile"], "a file, not a directory"),
    (["--teacher", "middle", "--steps", "0", "--out", "{d}/run"], "--steps must be >= 0 and --steps + --on-policy-steps >= 1"),
    (["--teacher", "middle", "--steps", "-1", "--on-policy-steps", "5", "--out", "{d}/run"], "--steps must be >= 0"),
    (["--teacher", "middle", "--on-policy-steps", "-2", "--out", "{d}/run"], "--on-policy-steps must be >= 0"),
    (["--teacher", "middle", "--on-policy-lr", "0", "--out", "{d}/run"], "--on-policy-lr must be > 0"),
    (["--teacher", "middle", "--shards-dir", "{d}/shards_bad", "--out", "{d}/run"],
     "shards_bad/meta.json: not a readable JSON file"),
])
def test_distill_train_bad_input(files, capsys, argv, message):
    from distill.train import main
    rc, err = _cli(capsys, argv, files, main=main)
    assert rc == 2
    _one_error_line(err, message.format(d=files))


@pytest.mark.parametrize("argv, message", [
    (["--student", "{d}/distill-run/student"], "no such directory; train a student first"),   # the README's
    (["--student", "{d}/distill-run"], "no such directory; train a student first"),
    (["--student", "{d}/student_bad"], "field 'depth' must be an integer"),
    (["--student", "{d}/student_sampling"], "student_sampling/sampling.json: not valid sampling settings "
                                            "(passes must be an integer >= 1, got 0)"),
    (["--student", "{d}/student_bad", "--device", "tpu"], "unknown device 'tpu'"),
    (["--student", "{d}/student_bad", "--windows", "0"], "--windows must be an integer >= 1"),
])
def test_distill_evaluate_bad_input(files, capsys, argv, message):
    from distill.evaluate import main
    rc, err = _cli(capsys, argv, files, main=main)
    assert rc == 2
    _one_error_line(err, message.format(d=files))


@pytest.mark.parametrize("argv, message", [
    (["--teacher", "middle", "--student", "{d}/distill-run/student", "--shards", "{d}/distill-run/shards",
      "--write"], "no such directory; run python -m distill.train first"),                   # the README's
    (["--teacher", "middle", "--student", "{d}/dir.wav", "--shards", "{d}/dir.wav", "--passes", "0"],
     "--passes must be an integer >= 1"),
    (["--teacher", "middle", "--student", "{d}/student_bad", "--shards", "{d}/dir.wav", "--out", "{d}/dir.npz"],
     "--out '{d}/dir.npz' is a directory"),
    (["--teacher", "middle", "--student", "{d}/student_bad", "--shards", "{d}/dir.wav", "--out", "{d}/t.json"],
     "field 'depth' must be an integer"),
])
def test_distill_tune_bad_input(files, capsys, argv, message):
    from distill.tune import main
    rc, err = _cli(capsys, argv, files, main=main)
    assert rc == 2
    _one_error_line(err, message.format(d=files))


# --------------------------------------------------------------------------------------------
# the API
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return fj.load("tiny")


TOP = torch.randint(0, 16, (1, 8))


@pytest.mark.parametrize("call, error, message", [
    (lambda jb: jb.upsample(TOP, temperature=float("nan")), SettingsError,
     "temperature must be a finite number >= 0 (0: greedy), got nan"),
    (lambda jb: jb.upsample(TOP, temperature=-1.0), SettingsError, "temperature must be a finite number >= 0"),
    (lambda jb: jb.upsample(TOP, temperature=float("inf")), SettingsError, "temperature must be a finite number"),
    (lambda jb: jb.upsample(TOP, temperature={0: 0.5, 2: 0.5}), SettingsError,
     "temperature names level(s) 2, which this call does not sample; it samples level(s) 1, 0"),
    (lambda jb: jb.upsample(TOP, sampler={3: "parallel"}), SettingsError,
     "sampler names level(s) 3, which this call does not sample; it samples level(s) 1, 0"),
    (lambda jb: jb.upsample(TOP, sampler={0: "fast"}), SettingsError, "unknown sampler 'fast' for level 0"),
    (lambda jb: jb.upsample(TOP, sampler="parallel"), ValueError, "no parallel student for level 1"),
    (lambda jb: jb.upsample(TOP, top_k=2.5), SettingsError, "top_k must be an integer >= 0"),
    (lambda jb: jb.upsample(TOP, top_p=float("nan")), SettingsError, "top_p must be a number in [0, 1]"),
    (lambda jb: jb.upsample(TOP, chunk_size=0), SettingsError, "chunk_size must be an integer >= 1"),
    (lambda jb: jb.upsample(TOP, max_batch_size=0), SettingsError, "max_batch_size must be an integer >= 1"),
    (lambda jb: jb.upsample(TOP, gamma=True), SettingsError, "gamma must be an integer >= 1"),
    (lambda jb: jb.upsample(TOP, seed=1.5), SettingsError, "seed must be an integer or None"),
    (lambda jb: jb.upsample(TOP, temprature=0.5), SettingsError, "unknown sampling setting(s) temprature"),
    (lambda jb: jb.upsample(TOP.bool()), SettingsError, "level-2 codes must be integer codes, got torch.bool"),
    (lambda jb: jb.upsample(TOP.float()), SettingsError, "level-2 codes must be integer codes, got torch.float32"),
    (lambda jb: jb.upsample(TOP[:, :0]), SettingsError, "level-2 codes are empty (shape (1, 0))"),
    (lambda jb: jb.sample(seconds=float("nan")), SettingsError, "seconds must be a finite number > 0, got nan"),
    (lambda jb: jb.sample(seconds=1e9), SettingsError, f"seconds must be at most {MAX_SECONDS:g}"),
    (lambda jb: jb.sample(seconds=1e300), SettingsError, f"seconds must be at most {MAX_SECONDS:g}"),
    (lambda jb: jb.sample(seconds=1, n_samples=0), SettingsError, "n_samples must be an integer >= 1, got 0"),
    (lambda jb: jb.sample(seconds=1, levels=(3,)), SettingsError, "this model has priors for level(s) 2, 1, 0"),
    (lambda jb: jb.continue_([None, None, TOP], seconds=float("inf")), SettingsError,
     "seconds must be a finite number > 0"),
    (lambda jb: jb.continue_([None, None, TOP[:, :0]], seconds=1.0), SettingsError, "level-2 codes are empty"),
    (lambda jb: jb.continue_([None, None, None], seconds=1.0), SettingsError, "no codes given to continue from"),
    (lambda jb: jb.continue_([None, None, TOP], seconds=1.0, sampler={0: "ar"}, levels=(2,)), SettingsError,
     "sampler names level(s) 0, which this call does not sample; it samples level(s) 2"),
    (lambda jb: fj.load(""), CheckpointError, "no model given"),
    (lambda jb: fj.load("tiny", device="tpu"), SettingsError, "unknown device 'tpu'"),
])
def test_api_bad_input(tiny, call, error, message):
    with pytest.raises(error) as e:
        call(tiny)
    assert isinstance(e.value, ValueError)
    assert message in str(e.value)


def test_half_on_cpu_warns_once_with_the_cost(monkeypatch):
    import fastjukebox.settings as settings
    monkeypatch.setattr(settings, "_warned_half", False)
    with pytest.warns(UserWarning, match=r"bfloat16 on a CPU runs 3 to 11 times slower than float32"):
        fj.load("tiny", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fj.load("tiny", dtype=torch.float16)          # once per process


def test_bad_config_json_names_file_and_field(files):
    with pytest.raises(CheckpointError, match=r"model_width/prior_level_1/config\.json: field 'width'"):
        fj.load(files / "model_width")
    from distill.student import ParallelStudent
    with pytest.raises(CheckpointError, match=r"student_bad/config\.json.*field 'depth' must be an integer"):
        ParallelStudent.load(files / "student_bad")


# --------------------------------------------------------------------------------------------
# every flag documented, with its default
# --------------------------------------------------------------------------------------------

def _parsers():
    from distill.evaluate import build_parser as evaluate_parser
    from distill.train import build_parser as train_parser
    from distill.tune import build_parser as tune_parser
    top = cli.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    out = [(f"fastjukebox {name}", p) for name, p in sub.choices.items()]
    return out + [("distill.train", train_parser()), ("distill.evaluate", evaluate_parser()),
                  ("distill.tune", tune_parser())]


@pytest.mark.parametrize("name, parser", _parsers(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_flag_has_help_showing_its_default(name, parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = "/".join(action.option_strings) or action.dest
        assert action.help, f"{name}: {flag} has no help text"
        if action.option_strings and not action.required:
            shown = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in shown, f"{name}: {flag} does not show its default: {shown!r}"


# --------------------------------------------------------------------------------------------
# outputs: all or none, and the settings as used
# --------------------------------------------------------------------------------------------

def test_outputs_are_written_as_a_set(tmp_path, monkeypatch):
    from fastjukebox.atomic import atomic_paths
    a, b = tmp_path / "a.wav", tmp_path / "a.npz"
    a.write_text("old audio")
    with pytest.raises(RuntimeError):
        with atomic_paths([a, b]) as (ta, tb):
            ta.write_text("new audio")
            raise RuntimeError("the second file failed")
    assert a.read_text() == "old audio" and not b.exists()
    # a directory that appears while the work runs: refused before any file is replaced
    c = tmp_path / "c.png"
    with pytest.raises(ValueError, match="is a directory"):
        with atomic_paths([a, b, c]) as (ta, tb, tc):
            for t in (ta, tb, tc):
                t.write_text("new")
            c.mkdir()
    assert a.read_text() == "old audio" and not b.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "c.png"]
    c.rmdir()
    # a rename that fails half way puts back what it replaced and removes what it added
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == c:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        with atomic_paths([a, b, c]) as (ta, tb, tc):
            for t in (ta, tb, tc):
                t.write_text("new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert a.read_text() == "old audio" and not b.exists() and not c.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]
    with atomic_paths([a, b]) as (ta, tb):
        ta.write_text("new audio")
        tb.write_text("codes")
    assert a.read_text() == "new audio" and b.read_text() == "codes"


def test_gitignore_covers_the_commands_default_outputs():
    import fnmatch
    patterns = [l.strip().strip("/") for l in (Path(__file__).resolve().parents[1] / ".gitignore").read_text()
                .splitlines() if l.strip() and not l.startswith("#")]
    for name in ("upsampled.wav", "upsampled.npz", "upsampled.png", "sample.wav", "sample_0.wav", "sample.npz",
                 "continued.flac", "decoded.wav", "codes.npz", "song.wav", "tune.json", "distill-run",
                 "distill-eval-20260101-000000"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name


def test_npz_records_the_settings_as_used(tmp_path, capsys):
    def run(name, *extra):
        rc = cli.main(["sample", "--model", "tiny", "--seconds", "0.1", "--levels", "2", "-q", "--temperature",
                       "0.5", "--out", str(tmp_path / f"{name}.wav"), *extra])
        assert rc == 0, capsys.readouterr().err
        with np.load(tmp_path / f"{name}.npz") as f:
            return f["codes_level2"], json.loads(str(f["settings"]))

    codes, s = run("first")                       # no --seed: a random one, recorded
    assert (s["artist"], s["genre"], s["sampler"]) == (0, 0, {"2": "ar"})
    assert (s["temperature"], s["top_k"], s["top_p"], s["chunk_size"]) == (0.5, 0, 0.0, 32)
    assert s["sampled_levels"] == [2] and isinstance(s["seed"], int)
    replay, _ = run("again", "--seed", str(s["seed"]))
    np.testing.assert_array_equal(replay, codes)


# --------------------------------------------------------------------------------------------
# what is warned about, in one line
# --------------------------------------------------------------------------------------------

def test_cli_warns_of_half_precision_on_a_cpu(tmp_path, capsys, monkeypatch):
    import fastjukebox.settings as settings
    monkeypatch.setattr(settings, "_warned_half", False)
    rc = cli.main(["sample", "--model", "tiny", "--device", "cpu", "--dtype", "bf16", "--seconds", "0.1",
                   "--levels", "2", "-q", "--out", str(tmp_path / "o.wav")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert len(err.splitlines()) == 1
    assert err.startswith("fastjukebox sample: warning: bfloat16 on a CPU runs 3 to 11 times slower than float32")


def test_loud_input_audio_is_named(tmp_path, capsys):
    import soundfile as sf
    t = np.arange(44100) / 44100
    sf.write(tmp_path / "loud.wav", (9.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 44100, subtype="FLOAT")
    rc = cli.main(["encode", "--model", "tiny", str(tmp_path / "loud.wav"), "--out", str(tmp_path / "c.npz")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert len(err.splitlines()) == 1 and "warning: audio file" in err and "peaks at 9.5, above full scale" in err
    from fastjukebox.audio import load_audio
    with pytest.warns(UserWarning, match="peaks at 9.5"):
        audio = load_audio(tmp_path / "loud.wav")
    assert float(audio.abs().max()) == 1.0
