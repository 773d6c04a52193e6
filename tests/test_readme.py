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
