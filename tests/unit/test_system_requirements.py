"""A missing system requirement (PostgreSQL, Chromium) skips its tests, naming the install
command, except under CI, where it fails; the README's quick start lists every one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

NEEDS_MISSING = '''
from conftest import require_system

def test_needs_a_tool():
    require_system("the `frobnicate` tool", "sudo apt-get install -y frobnicate")
'''


def _pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_needs.py").write_text(NEEDS_MISSING)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           str(tmp_path / "test_needs.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_missing_requirement_skips_with_the_install_command(tmp_path: Path) -> None:
    proc = _pytest(tmp_path, None)
    assert proc.returncode == 0, proc.stdout
    assert "1 skipped" in proc.stdout
    assert "install with: sudo apt-get install -y frobnicate" in proc.stdout


def test_missing_requirement_fails_under_ci(tmp_path: Path) -> None:
    proc = _pytest(tmp_path, "true")
    assert proc.returncode == 1, proc.stdout
    assert "CI is set, so this must run" in proc.stdout


@pytest.mark.parametrize("package", ["postgresql", "chromium chromium-driver", "g++"])
def test_readme_quick_start_names_each_install_command(package: str) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert f"apt-get install -y {package}" in quick
    for place in (REPO / ".ci" / "run", REPO / ".github" / "workflows" / "ci.yml"):
        assert package.split()[0] in place.read_text(encoding="utf-8"), place
