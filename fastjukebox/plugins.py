"""Extensions of fastjukebox found through the ``fastjukebox.plugins`` entry-point group.

A package that adds window samplers or student models (this project's ``distill`` adds the
``"parallel"`` and ``"speculative"`` samplers and the parallel students) declares an entry point
in that group naming a function of no arguments. ``load_plugins`` calls each such function once;
the function registers what its package adds (``samplers.register_sampler``,
``bundle.register_component_loader``). fastjukebox imports none of them by name, so the layers
stay one-way: extensions import fastjukebox, never the reverse.

The entry points are package metadata: a source tree that is not installed (``pip install -e .``)
has none, and then only the exact samplers are there.
"""
from __future__ import annotations

import warnings
from importlib.metadata import entry_points

__all__ = ["GROUP", "load_plugins"]

GROUP = "fastjukebox.plugins"
_loaded = False


def load_plugins() -> None:
    """Call every registered plugin's function once per process (later calls do nothing). A
    plugin that fails to load is skipped with a warning naming it."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            ep.load()()
        except Exception as exc:   # a broken extension must not take the exact samplers with it
            warnings.warn(f"fastjukebox plugin {ep.name!r} ({ep.value}) failed to load: {exc}", stacklevel=2)
