"""Training progress on the tiny profile: lines when stderr is piped (as under `dvc repro`), a bar
on a terminal, the per-step history `reports/train/steps.csv`, and weights that do not depend on
any of it."""

from __future__ import annotations

import csv
import fcntl
import math
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pipelines.train as train_stage
import pytest
import torch

from conftest import REPO, run, tiny_raw, write_params

pytestmark = pytest.mark.slow

STEPS = [2, 4, 6, 8, 10, 12]  # tiny profile: max_steps 12, log_every_steps 2
LINE = re.compile(r"INFO nmt\.progress: step (\d+)/12 \(\d+%\) \| train/loss [\d.]+ \| lr [\d.e-]+ "
                  r"\| [\d,]+ tgt tok/s \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$")
BAR = re.compile(r"\| *\d+/12 \[")  # tqdm: "train: 100%|##########| 12/12 [00:02<00:00, ..."


def _command(processed: Path, root: Path) -> tuple[list[str], dict[str, str]]:
    params = write_params(root / "params.yaml", tiny_raw())
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{(root / 'mlflow.db').as_posix()}",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "pipelines/train.py", "--params", str(params), "--processed",
           str(processed), "--model-dir", str(root / "models"), "--reports",
           str(root / "reports/train")]
    return cmd, env


def test_piped_stderr_gets_progress_lines_and_per_step_history(tiny_data: dict,
                                                               tmp_path: Path) -> None:
    cmd, env = _command(tiny_data["processed"], tmp_path)
    err = run(cmd, REPO, env, timeout=600).stderr  # a pipe: not a terminal
    lines = [line for line in err.splitlines() if "nmt.progress: step " in line]
    assert [int(LINE.search(line).group(1)) for line in lines if LINE.search(line)] == STEPS, err
    assert "nmt.progress: training 12 steps" in err and not BAR.search(err)  # lines, no bar

    with (tmp_path / "reports/train/steps.csv").open(encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["step", "epoch", "train/loss", "train/ppl", "train/lr",
                                 "train/tokens_per_s", "elapsed_s"]
    assert [int(r["step"]) for r in rows] == STEPS
    assert all(math.isfinite(float(r["train/loss"])) and float(r["train/lr"]) > 0
               and float(r["train/tokens_per_s"]) > 0 for r in rows)
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed)


def test_terminal_gets_a_bar_and_the_lines(tiny_data: dict, tmp_path: Path) -> None:
    cmd, env = _command(tiny_data["processed"], tmp_path)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 0x0: no bar
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=follower,
                            stderr=follower)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 1.0)[0]:
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(leader)
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode("utf-8", errors="replace")
    assert BAR.search(text), text[-3000:]
    assert "nmt.progress: step 12/12 (100%)" in text


def test_weights_do_not_depend_on_progress_logging(tiny_data: dict, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   one_thread: None) -> None:
    """Dropout on, so any random number drawn by logging would change the weights."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}")
    saved = []
    for every in (1, 5):
        root = tmp_path / f"every_{every}"
        root.mkdir()
        params = write_params(root / "params.yaml", tiny_raw(model={"dropout": 0.2},
                                                             train={"log_every_steps": every}))
        assert train_stage.main(["--params", str(params), "--processed",
                                 str(tiny_data["processed"]), "--model-dir", str(root / "models"),
                                 "--reports", str(root / "reports/train")]) == 0
        saved.append(root / "models/model.pt")
    first, second = (torch.load(p, weights_only=True) for p in saved)
    assert first["step"] == second["step"] == 12
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key
    assert saved[0].read_bytes() == saved[1].read_bytes()  # same weights, same file
