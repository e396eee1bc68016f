"""`train.precision` on CPU: bf16 only with bf16 units; `auto` falls back to fp32 with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import nmt.precision as precision
from nmt.config import ConfigError
from nmt.precision import cpu_bf16_flags, resolve_precision


def test_cpu_without_bf16_units_auto_is_fp32_with_one_warning(
        no_bf16: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nmt.precision"):
        assert resolve_precision("auto", "cpu") == "32-true"
    assert len(caplog.records) == 1
    assert "train.precision auto: this CPU" in caplog.text and "amx_bf16" in caplog.text


def test_cpu_without_bf16_units_refuses_explicit_bf16(no_bf16: None) -> None:
    with pytest.raises(ConfigError, match=r"train.precision: 'bf16-mixed' needs a CPU with bf16 "
                                          r"units \(amx_bf16 or avx512_bf16"):
        resolve_precision("bf16-mixed", "cpu")


def test_cpu_with_bf16_units_trains_bf16_mixed(amx: None) -> None:
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert resolve_precision("auto", "cpu") == "bf16-mixed"


@pytest.mark.parametrize("fake", ["no_bf16", "amx"])
def test_fp32_stays_fp32_and_fp16_is_gpu_only(fake: str, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue(fake)
    assert resolve_precision("32-true", "cpu") == "32-true"
    with pytest.raises(ConfigError, match="train.precision: '16-mixed' needs a GPU"):
        resolve_precision("16-mixed", "cpu")


def test_flags_fall_back_to_proc_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def missing() -> dict:
        raise AttributeError("get_capabilities")

    monkeypatch.setattr(torch.cpu, "get_capabilities", missing)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Test CPU\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert cpu_bf16_flags() == ["avx512_bf16"] and precision.cpu_name() == "Test CPU"
    cpuinfo.write_text("model name\t: Old CPU\nflags\t\t: fpu sse avx2\n")
    assert cpu_bf16_flags() == []


def test_torch_capabilities_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities",
                        lambda: {"amx_bf16": False, "avx512_bf16": True, "avx2": True})
    assert cpu_bf16_flags() == ["avx512_bf16"]


def test_describe_cpu_names_the_model_and_the_flags_that_set_speeds(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Test CPU\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 "
                       "avx512_vnni sha_ni\n")
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    cpu = precision.describe_cpu()
    assert cpu["model_name"] == "Test CPU" and cpu["bf16_flags"] == ["avx512_bf16"]
    assert cpu["flags"] == ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]
    assert isinstance(cpu["cores"], int) and cpu["cores"] >= 1
