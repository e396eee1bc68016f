"""The training resume fingerprint covers every module the train stage runs (nmt.sources)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PRINT_FINGERPRINT = """
import sys
from pathlib import Path
from nmt.config import load_params
from nmt.training import fingerprint
print(fingerprint(load_params(sys.argv[1]), Path(sys.argv[2])))
"""


def _fingerprint(src: Path, params: Path, processed: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(src))
    proc = subprocess.run([sys.executable, "-c", PRINT_FINGERPRINT, str(params), str(processed)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_a_change_in_any_imported_module_makes_a_checkpoint_stale(
        tmp_path: Path, tiny_params_file: Path) -> None:
    """data/padding.py decides the batches, yet a hand-kept list of sources once missed it."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "nmt", src / "nmt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    processed = tmp_path / "processed"
    processed.mkdir()
    (processed / "train.parquet").write_bytes(b"ids")
    target = src / "nmt" / "data" / "padding.py"
    seen = {_fingerprint(src, tiny_params_file, processed)}
    target.write_text(target.read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")
    seen.add(_fingerprint(src, tiny_params_file, processed))
    assert len(seen) == 2, "editing nmt/data/padding.py left the resume fingerprint unchanged"
