"""dvc.yaml deps cover the code each stage runs: its script and every `nmt` module it imports.

The imports are read from the code (`nmt.sources`, also used by the training resume fingerprint),
transitively. A dep on a folder (`src/nmt/model`) covers the modules inside it. When this fails,
add the listed paths to the stage's `deps` in dvc.yaml.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from nmt.sources import package_imports

PACKAGE_DIR = REPO / "src" / "nmt"
STAGES: dict[str, dict] = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _script(stage: str) -> Path:
    """The stage's entry point: the `pipelines/*.py` file its command runs."""
    words = STAGES[stage]["cmd"].split()
    scripts = [w for w in words if w.startswith("pipelines/") and w.endswith(".py")]
    assert len(scripts) == 1, f"stage {stage}: expected one pipelines/*.py in {words}"
    return REPO / scripts[0]


def _dep_paths(stage: str) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in STAGES[stage].get("deps", [])]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(s for s in STAGES if "pipelines/" in STAGES[s]["cmd"]))
def test_stage_deps_list_every_module_its_script_imports(stage: str) -> None:
    script = _script(stage)
    needed = [script, *package_imports(script, PACKAGE_DIR)]
    deps = _dep_paths(stage)
    missing = [rel for rel in (p.relative_to(REPO).as_posix() for p in needed)
               if not _covered(rel, deps)]
    assert not missing, (f"dvc.yaml stage {stage!r} runs code it does not list; add to its "
                         f"deps:\n" + "\n".join(f"      - {m}" for m in missing))


def test_imports_are_found_transitively_and_inside_functions(tmp_path: Path) -> None:
    pkg = tmp_path / "nmt"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Docstring only."""\n')
    (pkg / "sub" / "__init__.py").write_text("from nmt.sub.leaf import X\n")
    (pkg / "sub" / "leaf.py").write_text("X = 1\n")
    (pkg / "a.py").write_text("from nmt import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import g\n    return g\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    import nmt.typing_only\ng = 1\nimport nmt.sub\n")
    (pkg / "typing_only.py").write_text("")
    entry = tmp_path / "entry.py"
    entry.write_text("import os\nfrom nmt.a import something\n")
    found = {p.relative_to(pkg).as_posix() for p in package_imports(entry, pkg)}
    assert found == {"a.py", "b.py", "c.py", "sub/__init__.py", "sub/leaf.py"}
