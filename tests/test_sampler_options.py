"""Sampler options pass through the seam (``fastjukebox.samplers``): a registered sampler declares
them with their defaults and checks, a call gives them as ``sampler_options`` (``--sampler-opt``
on the command line; ``passes=`` / ``gamma=`` are short for them), and the core names none."""
import json

import numpy as np
import pytest
import torch

import fastjukebox
import fastjukebox.generate as generate
from distill.sampler import ParallelWindowSampler
from distill.speculative import DISABLE_AT_BATCH, GAMMA
from distill.student import ParallelStudent
from fastjukebox.bundle import Jukebox
from fastjukebox.cli import build_parser
from fastjukebox.cli import main as cli_main
from fastjukebox.plugins import load_plugins
from fastjukebox.samplers import (SAMPLER_OPTIONS, SAMPLERS, STUDENT_SAMPLERS, SamplerOption,
                                  build_window_samplers, describe_options, options_record, register_sampler)
from fastjukebox.sampling import ARWindowSampler
from fastjukebox.settings import SettingsError, check_count


@pytest.fixture(scope="module")
def tiny():
    load_plugins()
    return fastjukebox.load("tiny")


@pytest.fixture(scope="module")
def with_students(tiny):
    """The tiny family with students (the teachers' weights) for both upsamplers, in memory."""
    students = {level: ParallelStudent.from_teacher(tiny.prior(level)) for level in (0, 1)}
    return Jukebox(tiny.vqvae, {l: tiny.prior(l) for l in tiny.levels}, students)


@pytest.fixture
def registry():
    """The sampler registry as it was, restored after the test."""
    saved = dict(SAMPLERS), dict(SAMPLER_OPTIONS), set(STUDENT_SAMPLERS)
    yield
    for live, old in zip((SAMPLERS, SAMPLER_OPTIONS, STUDENT_SAMPLERS), saved):
        live.clear()
        live.update(old)


@pytest.fixture
def no_model_work(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("sampled before the settings were checked")
    monkeypatch.setattr(generate, "sample_levels", refuse)


def _top(jb, n=1):
    c = jb.prior(2).config
    return torch.randint(0, c.l_bins, (n, c.n_ctx), generator=torch.Generator().manual_seed(0))


def test_an_unknown_option_is_named_before_any_model_work(tiny, no_model_work):
    with pytest.raises(SettingsError, match="unknown sampler option 'pases'; the samplers take: passes "
                                            r"\(parallel: .*\); gamma \(speculative: "):
        tiny.upsample(_top(tiny), sampler_options={"pases": 2})


def test_an_option_no_chosen_sampler_takes_is_named(tiny, no_model_work):
    with pytest.raises(SettingsError, match="sampler option 'gamma' is taken by the speculative sampler"
                                            r"\(s\), which this call does not use \(it samples 1=ar, 0=ar\)"):
        tiny.upsample(_top(tiny), sampler="ar", sampler_options={"gamma": 4})
    with pytest.raises(SettingsError, match="sampler option 'passes' is taken by the parallel sampler"):
        tiny.upsample(_top(tiny), passes=2)                       # the alias maps into the options


def test_a_bad_value_is_named_by_the_declaring_sampler_rule(tiny, with_students, no_model_work):
    with pytest.raises(SettingsError, match="passes must be an integer >= 1, got 0"):
        with_students.upsample(_top(tiny), sampler="parallel", sampler_options={"passes": 0})
    with pytest.raises(SettingsError, match="gamma must be an integer >= 1, got 'x'"):
        with_students.upsample(_top(tiny), sampler="speculative", sampler_options={"gamma": "x"})
    with pytest.raises(SettingsError, match="sampler_options must be a mapping from option name to value"):
        with_students.upsample(_top(tiny), sampler="parallel", sampler_options=[("passes", 2)])
    with pytest.raises(SettingsError, match=r"passes is given twice: passes=3 and sampler_options\['passes'\]=2"):
        with_students.upsample(_top(tiny), sampler="parallel", passes=3, sampler_options={"passes": 2})


def test_an_option_reaches_the_sampler(with_students):
    used = with_students.resolve_sampling((1, 0), {"sampler": "parallel", "sampler_options": {"passes": 2}})
    assert used["sampler_options"] == {"passes": 2}
    built = build_window_samplers(with_students, used["sampler"], used["sampler_options"])
    assert all(isinstance(s, ParallelWindowSampler) and s.passes == 2 for s in built.values())
    assert set(built) == {1, 0}
    assert options_record(used["sampler"], used["sampler_options"], built) == {"passes": {1: 2, 0: 2}, "gamma": None,
                                                                                   "disable_at_batch": None}


def test_defaults_come_from_the_registration(with_students):
    """Nothing given: "speculative" verifies ``distill.speculative.GAMMA`` positions per call, decodes
    token by token from the device's ``DISABLE_AT_BATCH`` rows, and "parallel" runs each student's own
    passes; the record says so."""
    names = {1: "speculative", 0: "parallel"}
    built = build_window_samplers(with_students, names, {})
    own = with_students.student(0).sampling.passes
    crossover = DISABLE_AT_BATCH.get(with_students.prior(1).device.type)
    assert built[1].gamma == GAMMA and built[0].passes == own and built[1].disable_at_batch == crossover
    assert options_record(names, {}, built) == {"passes": {0: own}, "gamma": GAMMA, "disable_at_batch": {1: crossover}}


def test_the_run_records_the_options_as_used(with_students):
    z = _top(with_students)
    res = with_students.upsample(z, sampler={1: "ar", 0: "parallel"}, sampler_options={"passes": 2}, seed=0,
                                 progress=False)
    assert res.settings["passes"] == {0: 2} and res.settings["gamma"] is None and res.settings["disable_at_batch"] is None
    assert res.settings["sampler"] == {1: "ar", 0: "parallel"}


def test_a_sampler_registered_with_its_own_option_gets_its_default(tiny, registry):
    made = []

    def factory(jb, level, width, **_):
        made.append((level, width))
        return ARWindowSampler(jb.prior(level), 1)

    register_sampler("test-width", factory, options={"width": SamplerOption(3, check_count, help="test width")})
    assert "width (test-width: test width)" in describe_options()
    res = tiny.upsample(_top(tiny), sampler="test-width", seed=0, progress=False)
    assert made == [(1, 3), (0, 3)] and res.settings["width"] == 3
    res = tiny.upsample(_top(tiny), sampler="test-width", sampler_options={"width": 5}, seed=0, progress=False)
    assert made[2:] == [(1, 5), (0, 5)] and res.settings["width"] == 5
    with pytest.raises(SettingsError, match="width must be an integer >= 1, got 0"):
        tiny.upsample(_top(tiny), sampler="test-width", sampler_options={"width": 0})
    plain = []
    register_sampler("test-plain", lambda jb, level, depth, **_: plain.append(depth) or ARWindowSampler(
        jb.prior(level), 1), options={"depth": "deep"})             # a plain default, any value
    tiny.upsample(_top(tiny), sampler={1: "test-plain", 0: "ar"}, seed=0, progress=False)
    assert plain == ["deep"]


def test_register_sampler_names_bad_options(registry):
    f = lambda jb, level, **_: None   # noqa: E731
    with pytest.raises(ValueError, match="option 'seed' is the name of a sampling setting"):
        register_sampler("test-x", f, options={"seed": 1})
    with pytest.raises(ValueError, match="option 'batch' is taken"):
        register_sampler("test-x", f, options={"batch": 1})
    with pytest.raises(ValueError, match="an option name must be an identifier, got 'a-b'"):
        register_sampler("test-x", f, options={"a-b": 1})
    with pytest.raises(ValueError, match="the default of option 'n' fails its check"):
        register_sampler("test-x", f, options={"n": SamplerOption(0, check_count)})
    assert "test-x" not in SAMPLERS


def _parse(*argv):
    return build_parser().parse_args(["sample", "--model", "tiny", *argv])


def test_cli_sampler_opt_parses(tiny):
    args = _parse("--sampler-opt", "passes=2", "--sampler-opt", "gamma = 4", "--sampler-opt", "mode=fast",
                  "--sampler-opt", "scale=0.5", "--sampler-opt", "cache=false", "--sampler-opt", "k=none")
    assert args.sampler_opt == {"passes": 2, "gamma": 4, "mode": "fast", "scale": 0.5, "cache": False, "k": None}
    assert _parse().sampler_opt is None and _parse().passes is None and _parse().gamma is None


@pytest.mark.parametrize("value, message", [
    ("passes", "argument --sampler-opt: expected NAME=VALUE such as 'passes=2', got 'passes'"),
    ("passes=", "argument --sampler-opt: expected NAME=VALUE such as 'passes=2', got 'passes='"),
    ("=2", "argument --sampler-opt: expected NAME=VALUE such as 'passes=2', got '=2'"),
    ("two words=2", "argument --sampler-opt: expected NAME=VALUE"),
])
def test_cli_refuses_a_malformed_sampler_opt(capsys, value, message):
    with pytest.raises(SystemExit) as e:
        _parse("--sampler-opt", value)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_refuses_an_option_given_twice(capsys):
    with pytest.raises(SystemExit):
        _parse("--sampler-opt", "passes=2", "--sampler-opt", "passes=3")
    assert "argument --sampler-opt: option 'passes' is given twice" in capsys.readouterr().err


def test_cli_names_an_unknown_option(tmp_path, capsys):
    rc = cli_main(["sample", "--model", "tiny", "--seconds", "0.1", "--levels", "2", "--sampler-opt", "pases=2",
                   "-q", "--out", str(tmp_path / "s.wav")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: unknown sampler option 'pases'" in err
    assert not (tmp_path / "s.npz").exists()


@pytest.fixture(scope="module")
def family(with_students, tmp_path_factory):
    path = tmp_path_factory.mktemp("family")
    with_students.save(path)
    return path


def test_cli_sampler_opt_reaches_the_sampler_and_the_record(family, tmp_path):
    out = tmp_path / "s.wav"
    rc = cli_main(["sample", "--model", str(family), "--seconds", "0.8", "--seed", "0", "--sampler",
                   "1=ar,0=parallel", "--sampler-opt", "passes=3", "--quiet", "--out", str(out)])
    assert rc == 0
    with np.load(out.with_suffix(".npz")) as f:
        settings = json.loads(str(f["settings"]))
    assert settings["passes"] == {"0": 3} and settings["gamma"] is None


def test_speculative_decides_by_the_runs_batch_so_a_share_draws_what_the_run_draws(with_students):
    """A call drawing 2 samples of an 8-sample run (``run_samples``, as a process of a launch does)
    builds its samplers for the run's batch, min(8, max_batch_size): at the crossover or above,
    "speculative" decodes token by token, so the share's codes are "ar"'s with the same per-sample
    seeds; below, it drafts (other codes from the same distribution). Bad values are named."""
    z = _top(with_students, 2)
    kw = dict(sampler_options={"disable_at_batch": 4}, sample_seeds=[5, 6], progress=False)
    ar = with_students.upsample(z, sampler="ar", sample_seeds=[5, 6], progress=False)
    share = with_students.upsample(z, sampler="speculative", run_samples=8, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ar.codes[:2], share.codes[:2]))
    assert share.settings["run_samples"] == 8
    small = with_students.upsample(z, sampler="speculative", run_samples=8, max_batch_size=2, **kw)
    alone = with_students.upsample(z, sampler="speculative", **kw)
    assert torch.equal(small.codes[0], alone.codes[0]) and not torch.equal(alone.codes[0], ar.codes[0])
    built = build_window_samplers(with_students, {1: "speculative", 0: "speculative"}, {}, batch=8)
    assert all(s.run_batch == 8 for s in built.values())
    with pytest.raises(SettingsError, match=r"run_samples \(1\) is fewer than the 2 samples of this call"):
        with_students.upsample(z, sampler="speculative", run_samples=1, progress=False)
    with pytest.raises(SettingsError, match="run_samples must be an integer >= 1, got 0"):
        with_students.upsample(z, sampler="speculative", run_samples=0, progress=False)
