"""Repository invariants: CI runs the README's test command; the algorithm package never imports the integration."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"The test command is `([^`]+)`", text)
    assert match, "README.md must state 'The test command is `...`'"
    return match.group(1)


def test_ci_runs_the_readme_test_command():
    command = _readme_test_command()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f".ci/run must run {command!r} verbatim"
    assert "pip install -q torch==2.13.0" in ci_lines
    assert ci_lines.index("pip install -q torch==2.13.0") < ci_lines.index(command)


def test_script_prune_never_imports_llava():
    offenders = []
    for path in (ROOT / "script_prune").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n == "llava" or n.startswith("llava.")]
    assert not offenders, f"script_prune must not import llava: {offenders}"


def test_readme_library_snippet_runs(capsys):
    """The README's first Python block that calls ``sp.select`` (the script_prune API tour; the block before
    it, the transformers-native patch API, needs a hub checkpoint) runs and keeps 64 tokens per image."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    blocks = [b for b in blocks if "sp.select(" in b]
    assert blocks, "README.md has no python block calling sp.select"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    keep = namespace["keep"]
    assert tuple(keep.shape) == (2, 64)
    assert bool((keep[:, 1:] > keep[:, :-1]).all()), "select must return ascending indices"
    assert "script" in capsys.readouterr().out
