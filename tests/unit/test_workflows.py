"""GitHub workflows: linted by actionlint (+ check-jsonschema), wired to scripts/retrain.py.

Also unit tests of retrain.py's pure parts (BLEU gate, -S overrides from a profile).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_PROFILE

WORKFLOWS = REPO / ".github" / "workflows"
FILES = [WORKFLOWS / "ci.yml", WORKFLOWS / "retrain.yml"]
RETRAIN_TRIGGER_PATHS = {"params.yaml", "dvc.yaml", "dvc.lock", "src/**", "pipelines/**"}

BROKEN = """\
name: broken
on:
  pull_request:
jobs:
  test:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - run: echo "${{ steps.nope.outputs.rc }}"
      - run: echo "${{ github.event.pull_request.title }}"
      - uses: actions/setup-python@v5
        with:
          python-versions: "3.11"
"""


def _retrain_module():
    spec = importlib.util.spec_from_file_location("retrain", REPO / "scripts" / "retrain.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["retrain"] = module  # dataclasses look the module up while building the class
    spec.loader.exec_module(module)
    return module


retrain = _retrain_module()


def _tool(name: str) -> str:
    """A console script from this venv (dev dependency), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not installed: pip install -c constraints.txt -e '.[dev]'")
    return found


def _actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("actionlint"), "-no-color", *map(str, files)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _load(path: Path) -> dict:
    # PyYAML reads the key `on:` as True (YAML 1.1 boolean); map it back.
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if True in data:
        data["on"] = data.pop(True)
    return data


def _run_scripts(workflow: dict) -> list[str]:
    return [step["run"] for job in workflow["jobs"].values() for step in job["steps"]
            if "run" in step]


# ------------------------------------------------------------------------------- linting
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_actionlint_passes(path: Path) -> None:
    proc = _actionlint(path)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_actionlint_flags_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(BROKEN, encoding="utf-8")
    proc = _actionlint(broken)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert 'property "nope" is not defined' in out
    assert '"github.event.pull_request.title" is potentially untrusted' in out  # injection
    assert 'input "python-versions" is not defined' in out


def test_check_jsonschema_agrees(tmp_path: Path) -> None:
    cmd = [_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows"]
    ok = subprocess.run([*cmd, *map(str, FILES)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text("name: bad\njobs:\n  t:\n    steps: []\n", encoding="utf-8")  # no on/runs-on
    proc = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------- wiring
def test_ci_runs_the_readme_test_command() -> None:
    ci = _load(WORKFLOWS / "ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    steps = ci["jobs"]["test"]["steps"]
    setup = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["python-version"] == "3.11" and setup["with"]["cache"] == "pip"
    assert any(re.match(r"make test\b", run) for run in _run_scripts(ci))


def test_retrain_triggers_permissions_and_steps() -> None:
    wf = _load(WORKFLOWS / "retrain.yml")
    on = wf["on"]
    for event in ("push", "pull_request"):
        assert set(on[event]["paths"]) == RETRAIN_TRIGGER_PATHS, event
    assert on["schedule"][0]["cron"]
    assert {"overrides", "profile", "base", "tolerance", "until"} <= set(
        on["workflow_dispatch"]["inputs"])
    job = wf["jobs"]["retrain"]
    assert job["permissions"]["pull-requests"] == "write"
    steps = job["steps"]
    uses = {s["uses"].split("@")[0]: s for s in steps if "uses" in s}
    assert uses["actions/checkout"]["with"]["fetch-depth"] == 0
    assert uses["actions/cache"]["with"]["path"] == ".dvc/cache"
    assert "actions/github-script" in uses and "actions/upload-artifact" in uses
    scripts = "\n".join(_run_scripts(wf))
    assert "make install" in scripts and "python scripts/retrain.py" in scripts
    assert "$GITHUB_STEP_SUMMARY" in scripts


def test_retrain_workflow_uses_only_flags_the_script_has() -> None:
    parser_flags = {opt for action in retrain.build_parser()._actions
                    for opt in action.option_strings}
    scripts = "\n".join(_run_scripts(_load(WORKFLOWS / "retrain.yml")))
    step = scripts[scripts.index("args=("):scripts.index("python scripts/retrain.py")]
    used = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", step))
    assert used and used <= parser_flags, used - parser_flags


# ------------------------------------------------------------------------------- retrain.py
@pytest.mark.parametrize(("old", "new", "tolerance", "passed"), [
    (30.0, 29.5, 1.0, True),     # within the tolerance
    (30.0, 28.9, 1.0, False),    # dropped by 1.1
    (30.0, 30.0, -0.5, False),   # a negative tolerance demands an improvement
    (30.0, 30.6, -0.5, True),
    (None, 12.0, 1.0, True),     # the base has no BLEU: skipped
    (30.0, None, 1.0, False),    # the base had one, this run has none
])
def test_gate(old: float | None, new: float | None, tolerance: float, passed: bool) -> None:
    gate = retrain.Gate(old, new, tolerance)
    assert gate.passed is passed
    assert ("PASS" in gate.describe() or "SKIPPED" in gate.describe()) is passed


def test_read_bleu_prefers_the_evaluate_metrics() -> None:
    diff = {"reports/train/metrics.json": {"test/bleu": {"old": 1.0, "new": 2.0}},
            "reports/evaluate/metrics.json": {"test/bleu": {"old": 30.0, "new": 31.0}},
            "reports/vectorize/stats.json": {"pairs": {"old": 1, "new": 1}}}
    assert retrain.read_bleu(diff) == (30.0, 31.0)
    assert retrain.read_bleu({"x.json": {"loss": {"old": 1, "new": 2}}}) == (None, None)


def test_profile_becomes_quoted_overrides() -> None:
    overrides = retrain.profile_overrides(TINY_PROFILE)
    assert "download.url='http://127.0.0.1:9/fra-eng.zip'" in overrides
    assert "model.hidden=16" in overrides and "model.dropout=0.0" in overrides
    raw = yaml.safe_load(TINY_PROFILE.read_text(encoding="utf-8"))
    assert len(overrides) == sum(1 for _ in retrain.flatten(raw))
    assert retrain.hydra_value([5, 10]) == "[5,10]"
    assert retrain.hydra_value("it's") == "'it\\'s'"
    assert retrain.hydra_value(True) == "true"


def test_exp_command_applies_profile_then_overrides() -> None:
    args = retrain.build_parser().parse_args(
        ["--profile", str(TINY_PROFILE), "-S", "train.lr=0.003", "--name", "smoke"])
    cmd, shown, notes = retrain.exp_command(args, ["download", "train", "evaluate", "export"])
    assert cmd[:4] == ["exp", "run", "--name", "smoke"] and cmd[-1] == "evaluate"
    sets = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-S"]
    assert sets[-1] == "train.lr=0.003" and "model.hidden=16" in sets
    assert shown.endswith("-S train.lr=0.003 evaluate") and "from" in shown
    cmd, _, notes = retrain.exp_command(retrain.build_parser().parse_args([]), ["download"])
    assert cmd == ["exp", "run"] and "no `evaluate` stage" in notes[0]
