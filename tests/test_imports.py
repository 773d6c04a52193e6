"""The project's layers import downward only, no package's modules form an import cycle, and each
fastjukebox module imports on its own.

Layers: ``kernels`` imports nothing of the project; ``fastjukebox`` imports ``kernels`` only;
``distill`` imports ``fastjukebox`` and ``kernels``; ``benchmarks`` any of them (extensions plug
into fastjukebox through its registries, ``fastjukebox.plugins``).

The static check reads every ``import`` of the package (function-level ones too: a lazy import
that closes a cycle still ties the two modules together). The dynamic check imports each module
as the first of the package in a fresh process (forked after the third-party packages are loaded,
so the whole check takes seconds, not one interpreter start per module).
"""
import ast
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fastjukebox"
PACKAGES = ("kernels", "fastjukebox", "distill", "benchmarks")
ALLOWED = {"kernels": set(), "fastjukebox": {"kernels"}, "distill": {"kernels", "fastjukebox"},
           "benchmarks": {"kernels", "fastjukebox", "distill"}}   # what each may import of the others


def package_modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    out = {}
    for f in sorted((root / package).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body."""
    mods = package_modules(root, package)
    graph = {}
    for name, (f, is_pkg) in mods.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                # ``from pkg import sub`` depends on pkg.sub when that is a module, else on pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_violations(root: Path, packages=PACKAGES, allowed=ALLOWED) -> list[str]:
    """``"module imports package"`` for every import, anywhere in a module's body (function-level
    ones too), of a project package its layer may not use."""
    found = set()
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            module = ".".join(f.relative_to(root).with_suffix("").parts)
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in packages and top != pkg and top not in allowed[pkg]:
                        found.add(f"{module} imports {top}")
    return sorted(found)


def test_layers_import_downward_only():
    assert layer_violations(ROOT) == []


def test_the_layer_check_fails_on_an_upward_import(tmp_path):
    """The project's own modules, copied, plus one upward import per layer: each is named."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=lambda d, names: [
            n for n in names if not n.endswith(".py") and not (Path(d) / n).is_dir()])
    assert layer_violations(tmp_path) == []
    (tmp_path / "kernels" / "planted.py").write_text("from fastjukebox.config import PRESETS\n")
    (tmp_path / "fastjukebox" / "planted.py").write_text("def f():\n    import distill.sampler\n")
    (tmp_path / "distill" / "planted.py").write_text("from benchmarks import report\n")
    assert layer_violations(tmp_path) == ["distill.planted imports benchmarks", "fastjukebox.planted imports distill",
                                          "kernels.planted imports fastjukebox"]


def test_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pk"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("from . import a\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text("from ..c import x\nfrom pk import b\n")
    graph = import_graph(tmp_path, "pk")
    assert graph["pk.sub.d"] == {"pk.c", "pk.b"}
    assert cycles(graph) == [["pk.a", "pk.b"]]


def test_no_import_cycle_in_any_package():
    found = {pkg: cycles(import_graph(ROOT, pkg)) for pkg in PACKAGES}
    assert not any(found.values()), f"import cycles: {found}"


def test_each_module_imports_alone():
    names = [n for n in package_modules(ROOT, PACKAGE) if not n.endswith("__main__")]
    script = textwrap.dedent(f"""
        import importlib, json, os, sys, traceback
        import numpy, torch, safetensors, tqdm   # third-party packages, loaded once
        failed = {{}}
        for name in {names!r}:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    importlib.import_module(name)
                    code = 0
                except BaseException:
                    os.write(w, traceback.format_exc(limit=3).encode()[-2000:])
                    code = 1
                os._exit(code)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                err = f.read().decode()
            _, status = os.waitpid(pid, 0)
            if status:
                failed[name] = err or f"status {{status}}"
        print(json.dumps(failed))
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    failed = json.loads(res.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())
    assert len(names) > 30
