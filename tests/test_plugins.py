"""Extensions plug into fastjukebox through the ``fastjukebox.plugins`` entry points: the installed
project registers distill's samplers and students, and a broken extension is named, not fatal."""
import pytest

import fastjukebox.plugins as plugins
from fastjukebox.samplers import SAMPLERS, STUDENT_SAMPLERS, register_sampler


def test_the_installed_project_registers_distill():
    plugins.load_plugins()
    assert {"parallel", "speculative"} <= set(SAMPLERS) and {"parallel", "speculative"} <= STUDENT_SAMPLERS
    import fastjukebox as fj
    jb = fj.load("demo")
    assert set(jb.students) == {"0", "1"}
    from distill.student import ParallelStudent
    assert isinstance(jb.student(0), ParallelStudent)


class _EntryPoint:
    def __init__(self, name, fn):
        self.name, self.value, self._fn = name, f"tests:{name}", fn

    def load(self):
        if isinstance(self._fn, Exception):
            raise self._fn
        return self._fn


def test_each_plugin_runs_once_and_a_broken_one_warns(monkeypatch):
    calls = []
    eps = [_EntryPoint("good", lambda: calls.append(1)), _EntryPoint("broken", ImportError("no module named x"))]
    monkeypatch.setattr(plugins, "entry_points", lambda group: eps if group == plugins.GROUP else [])
    monkeypatch.setattr(plugins, "_loaded", False)
    with pytest.warns(UserWarning, match="plugin 'broken'.*no module named x"):
        plugins.load_plugins()
    plugins.load_plugins()
    assert calls == [1]


def test_register_sampler_names_bad_arguments_and_tracks_student_samplers(monkeypatch):
    monkeypatch.setitem(SAMPLERS, "x", None)
    register_sampler("x", lambda jb, level, **_: None, needs_student=True)
    assert "x" in STUDENT_SAMPLERS
    register_sampler("x", lambda jb, level, **_: None)
    assert "x" not in STUDENT_SAMPLERS
    for name, factory in (("", lambda: None), ("y", None)):
        with pytest.raises(ValueError, match="a sampler needs a name and a factory"):
            register_sampler(name, factory)
