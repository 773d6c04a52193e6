"""The README's Python snippet runs as written."""
import re
from pathlib import Path


def test_readme_api_snippet_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no Python snippet"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    out = scope["out"]
    assert out.audio.shape == (2, 44032) and out.audio.abs().max() <= 1.0
    assert [z.shape[1] for z in scope["more"].codes] == [8256, 2064, 516]


def _layout_entries(text: str, package: str) -> set[str]:
    """Names listed under ``package/`` in the layout block of ``docs/layout.md`` (two-space
    indented lines)."""
    block = re.search(r"## Modules\n\n```\n(.*?)```", text, flags=re.S)
    assert block, "docs/layout.md has no module block"
    lines = block.group(1).splitlines()
    start = lines.index(f"{package}/")
    names = set()
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        names.add(line.split()[0])
    return names


def test_layout_lists_the_package_modules():
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "layout.md").read_text(encoding="utf-8")
    pkg = root / "fastjukebox"
    on_disk = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    on_disk |= {f"{p.name}/" for p in pkg.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert _layout_entries(text, "fastjukebox") == on_disk


def test_readme_main_command_is_the_excerpt_upsample():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    main_cmd = commands[0]
    assert main_cmd.startswith("python3 -m venv .venv") and 'pip install "torch==2.13.*"' in main_cmd
    assert "fastjukebox upsample --model demo --from-audio demo:" in main_cmd and "--plot" in main_cmd
    assert '".[plots]"' in main_cmd       # --plot needs matplotlib


def test_readme_paths_exist():
    """Every document, result file and module path the README names is in the repository."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"\b((?:docs|benchmarks/results)/[\w./-]+\.(?:md|json|png))", text))
    assert any(p.startswith("docs/") for p in paths)
    missing = sorted(p for p in paths if not (root / p).is_file())
    assert not missing, missing
