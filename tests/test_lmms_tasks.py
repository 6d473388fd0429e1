"""The lmms-eval tasks that scripts/video/eval.sh and scripts/internvl3/eval.sh ask for are tasks the installed
lmms-eval ships (its task configs declare them by name), so a run cannot stop at lmms-eval's "task not found"
after the model has loaded. Read from lmms-eval's own YAML configs (``task:`` / ``group:`` keys)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("scripts/video/eval.sh", "scripts/internvl3/eval.sh")


def script_tasks(path: str) -> list[str]:
    """The comma-separated task list of the script's ``run_lmms SUITE MODEL CKPT TASKS ...`` call."""
    text = (ROOT / path).read_text()
    match = re.search(r"^run_lmms\s+\S+\s+\S+\s+\"[^\"]*\"\s*\\\n\s*([\w,]+)", text, flags=re.M)
    assert match, f"{path}: no run_lmms call with its task list found"
    return match.group(1).split(",")


def shipped_task_names() -> set[str]:
    lmms_eval = pytest.importorskip("lmms_eval")
    folder = Path(lmms_eval.__file__).parent / "tasks"
    names = set()
    for config in folder.rglob("*.yaml"):
        for line in config.read_text(errors="replace").splitlines():
            found = re.match(r"(?:task|group):\s*[\"']?([\w\-.]+)[\"']?\s*$", line)
            if found:
                names.add(found.group(1))
    if not names:
        pytest.skip(f"lmms-eval {getattr(lmms_eval, '__version__', '?')} ships no task configs (0.7.0 did not; 0.7.3 does)")
    return names


def test_script_task_lists_parse() -> None:
    assert script_tasks(SCRIPTS[0]) == ["mlvu_dev", "mvbench", "longvideobench_val_v", "videomme"]
    assert len(script_tasks(SCRIPTS[1])) == 8


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_task_of_the_script_is_shipped_by_lmms_eval(script: str) -> None:
    names = shipped_task_names()
    assert "mme" in names  # the parse itself works on a task every release has
    missing = [task for task in script_tasks(script) if task not in names]
    assert not missing, f"{script}: lmms-eval has no task {missing}"
