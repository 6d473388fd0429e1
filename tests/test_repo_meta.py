"""Repository invariants: CI runs the README's test command; the algorithm package never imports the integration."""
import ast
import re
from pathlib import Path

import pytest

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


def _lock_pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version and " " not in line, f"requirements/lock.txt: {line!r} is not an exact NAME==VERSION pin"
        pins[canonicalize_name(name)] = version
    return pins


def test_lock_pins_every_dependency_of_the_test_install_within_the_declared_ranges():
    """The lock is complete: the whole requirement tree of `script-prune[test]` (read from pyproject.toml and the
    installed packages' own metadata, markers evaluated for this Python) is pinned, and every pin of a direct
    dependency satisfies the range pyproject.toml declares.

    The tree is read from what is installed, so it says something about the lock only where the install is the
    lock's (as in CI); on another install (the newest or the lowest releases) the completeness half is skipped."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = _lock_pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for req in direct:
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements/lock.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements/lock.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req}"
    missing, drift, todo, seen = [], [], [(r, ()) for r in direct], set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        if name not in pins:
            missing.append(req.name)
            continue
        installed = Version(metadata.version(req.name)).public  # 2.13.0+cpu -> 2.13.0
        if installed != Version(pins[name]).public:
            drift.append(f"{req.name} {installed} (lock {pins[name]})")
        for sub in metadata.requires(req.name) or []:
            sub_req = Requirement(sub)
            if sub_req.marker is None or any(sub_req.marker.evaluate({"extra": e}) for e in (extras or ("",))):
                todo.append((sub_req, tuple(sub_req.extras)))
    if drift:
        pytest.skip(f"this environment was not installed from requirements/lock.txt: {', '.join(sorted(drift)[:4])}")
    assert not missing, f"requirements/lock.txt misses dependencies of the test install: {sorted(missing)}"


def test_install_lines_use_the_lock():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -c requirements/lock.txt -e ".[test]"' in ci
    assert 'pip install torch==2.13.0 && pip install -c requirements/lock.txt -e ".[test]" && python -m pytest -q' in readme
    assert 'pip install torch==2.13.0 && pip install -c requirements/lock.txt -e ".[viz]" && python -m llava.demo' in readme


def test_ci_gives_the_torchvision_tests_a_second_pass_with_the_pinned_release():
    """After the README's command, .ci/run makes the pinned torchvision import (scripts/torchvision_shim.sh) and runs
    the tests marked `torchvision`; the vLLM environment pins the same release."""
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    shim, second = "bash scripts/torchvision_shim.sh python", "python -m pytest -q -m torchvision"
    assert ci_lines.index(_readme_test_command()) < ci_lines.index(shim) < ci_lines.index(second)
    pins = [line for line in (ROOT / "requirements" / "torchvision.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins == ["torchvision==0.28.0"]
    assert pins[0] in (ROOT / "requirements" / "vllm.txt").read_text().splitlines()
    assert "bash scripts/torchvision_shim.sh" in (ROOT / "scripts" / "vllm_env.sh").read_text()
