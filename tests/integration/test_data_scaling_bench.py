"""bench/data_scaling.py at 1x on the tiny corpus: both stages run and the JSON adds up."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import FIXTURES, REPO, TINY_PROFILE

pytestmark = pytest.mark.slow

ARCHIVE = FIXTURES / "tiny/fra-eng.zip"


def test_replicated_copies_are_distinct_pairs(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from data_scaling import replicate
    finally:
        sys.path.remove(str(REPO / "bench"))
    lines = replicate(ARCHIVE, 3, tmp_path / "x3.zip", "fra.txt")
    with zipfile.ZipFile(tmp_path / "x3.zip") as zf:
        rows = [ln.split(b"\t")[:2] for ln in zf.read("fra-eng/fra.txt").splitlines()]
    assert len(rows) == lines and lines % 3 == 0
    first, third = rows[0], rows[2 * lines // 3]
    assert third == [first[0] + b" c2", first[1] + b" c2"]


def test_bench_runs_both_stages_at_1x(tmp_path: Path) -> None:
    out = tmp_path / "scaling"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench/data_scaling.py"), "--archive", str(ARCHIVE),
         "--sizes", "1", "--profile", str(TINY_PROFILE), "--out", str(out),
         "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result == json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert [r["stage"] for r in result["results"]] == ["validate", "vectorize"]
    for row in result["results"]:
        assert row["exit_code"] == 0 and row["wall_s"] > 0 and row["peak_rss_mb"] > 50
        assert len(row["load_before"]) == 3 and row["lines"] == 3003
    stats = json.loads((tmp_path / "work/x1/reports/stats.json").read_text(encoding="utf-8"))
    assert result["results"][1]["train_pairs"] == stats["train"]["pairs"] > 0
    assert out.with_suffix(".png").stat().st_size > 1000
