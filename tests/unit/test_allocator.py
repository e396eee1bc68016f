"""`nmt.allocator`: big freed tensors stay in the process (no page faults), results unchanged.

Each case runs in a fresh interpreter, since the malloc policy is process-wide and one-way.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from nmt.allocator import ENV

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Four untimed, then three counted SGD steps of a 256 -> 8,000 output layer on 1,500 rows: the
# logits and their gradient are 48 MB each, above glibc's largest mmap threshold (32 MiB).
PROBE = """
import hashlib, json, logging, resource, sys
import torch
from nmt.allocator import keep_freed_memory
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
kept = keep_freed_memory("train")
torch.manual_seed(0)
layer = torch.nn.Linear(256, 8000)
x = torch.randn(1500, 256)
opt = torch.optim.SGD(layer.parameters(), lr=0.1)
def step():
    loss = layer(x).logsumexp(-1).mean()
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(4):  # the kept heap settles into its size over the first steps
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in layer.state_dict().values()))
print(json.dumps({"kept": kept, "faults": faults, "weights": digest.hexdigest()}))
"""


def _probe(malloc: str | None) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(OMP_NUM_THREADS="1", **({ENV: malloc} if malloc else {}))
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@glibc
def test_kept_memory_avoids_page_faults_and_changes_no_weight() -> None:
    kept, _ = _probe(None)
    system, stderr = _probe("system")
    assert kept["kept"] is True and system["kept"] is False
    assert "NMT_MALLOC=system: malloc keeps the C library's defaults" in stderr
    # the default malloc maps and faults in the 48 MB tensors on every step (~12k pages each)
    assert system["faults"] > 20_000
    assert kept["faults"] < system["faults"] / 5
    assert kept["weights"] == system["weights"]


def test_without_glibc_it_does_nothing(monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    import nmt.allocator as allocator

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(allocator, "_applied", None)  # earlier tests may have trained in-process
    monkeypatch.setattr(allocator, "_said", set())
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    with caplog.at_level("INFO", logger="nmt.allocator"):
        assert allocator.keep_freed_memory("train") is False
    assert "malloc tuning skipped: needs glibc" in caplog.text


class FakeLibc:
    """Records mallopt calls instead of changing this test process's malloc."""

    def __init__(self, calls: list[tuple[int, int]]) -> None:
        def mallopt(param: int, value: int) -> int:
            calls.append((param, value))
            return 1
        self.mallopt = mallopt


@glibc
def test_a_process_keeps_the_stronger_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    import nmt.allocator as allocator

    calls: list[tuple[int, int]] = []
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda _name: FakeLibc(calls))
    assert allocator.keep_freed_memory("decode") and allocator.keep_freed_memory("decode")
    assert calls == list(allocator.SETTINGS["decode"])  # once
    assert allocator.keep_freed_memory("train")
    assert calls[2:] == [(allocator.M_MMAP_MAX, 0), (allocator.M_TRIM_THRESHOLD, 2**31 - 1)]
    assert allocator.keep_freed_memory("decode")  # does not weaken train's policy
    assert len(calls) == 4


# 40 convolutions of different shapes (oneDNN primitives), then the first shape again: a hit
# in oneDNN's cache only if the cache kept more than 40 primitives.
ONEDNN_PROBE = """
import os, torch
from nmt.allocator import bound_onednn_cache
print("capacity", bound_onednn_cache())
os.environ["ONEDNN_VERBOSE"] = "2"
w = torch.randn(32, 32, 3, 3)
for size in [*range(8, 48), 8]:
    torch.nn.functional.conv2d(torch.randn(2, 32, size, 16), w)
"""


def _onednn_probe(capacity: str | None) -> tuple[str, list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEDNN_")}
    env.update(OMP_NUM_THREADS="1", **({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": capacity}
                                       if capacity else {}))
    done = subprocess.run([sys.executable, "-c", ONEDNN_PROBE], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    lines = done.stdout.splitlines()
    creates = [line.split(",")[3] for line in lines  # "create:cache_hit" / "create:cache_miss"
               if ",primitive,create:" in line and ",convolution," in line]
    return lines[0], creates


def test_training_caps_onednn_primitive_cache_unless_the_environment_sets_it() -> None:
    said, creates = _onednn_probe(None)
    if not creates:
        pytest.skip("this torch build ran the probe's convolutions without oneDNN")
    assert said == "capacity 32"
    assert creates == ["create:cache_miss"] * 41  # the first shape was evicted by the 40 others
    said, creates = _onednn_probe("1024")  # the user's setting wins
    assert said == "capacity 1024"
    assert creates == ["create:cache_miss"] * 40 + ["create:cache_hit"]
