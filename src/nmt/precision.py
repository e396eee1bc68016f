"""`train.precision` resolved for the device; on CPU, bf16 only where the CPU has bf16 units.

    32-true     fp32 everywhere (the default)
    bf16-mixed  autocast to bf16 (Lightning's CPU or CUDA autocast); weights, loss and optimizer
                state stay fp32. On CPU it needs bf16 units (`amx_bf16` or `avx512_bf16`):
                without them bf16 is emulated and slower than fp32, so the run is refused
                with a ConfigError naming the setting (an explicit choice is not silently
                changed).
    16-mixed    fp16 autocast with a grad scaler: GPU only (refused on CPU).
    auto        bf16-mixed where the device has bf16 units (CUDA: `is_bf16_supported`, CPU:
                the flags above), else 32-true with a one-line warning (CPU) or an info line.

The CPU flags come from `torch.cpu.get_capabilities()` (cpuinfo, public since torch 2.x),
falling back to the `flags` line of /proc/cpuinfo.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import torch

from nmt.config import ConfigError

log = logging.getLogger(__name__)

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# the vector units that decide CPU speed here: fp32 width, bf16 and int8 (VNNI / AMX) products
SPEED_FLAGS = ("avx2", "avx512f", *BF16_FLAGS, "avx512_vnni", "avx_vnni", "amx_int8")
CPUINFO = Path("/proc/cpuinfo")
KEY = "train.precision"


def _cpuinfo_field(name: str) -> str:
    try:
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return ""


def cpu_name() -> str:
    """The CPU model name (`lscpu`'s "Model name"), or the platform's processor string."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "?"


def cpu_bf16_flags() -> list[str]:
    """Which of `amx_bf16`, `avx512_bf16` this CPU has (empty: no bf16 units)."""
    try:
        caps = dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError):
        caps = {}
    if any(flag in caps for flag in BF16_FLAGS):
        return [flag for flag in BF16_FLAGS if caps.get(flag)]
    flags = set(_cpuinfo_field("flags").split())
    return [flag for flag in BF16_FLAGS if flag in flags]


def describe_cpu() -> dict[str, object]:
    """The CPU for a benchmark's JSON: model name, cores, bf16 units and the speed flags it has.

    Every speed figure of this project names its CPU this way (`bench/`, reports/bench/).
    """
    flags = set(_cpuinfo_field("flags").split())
    return {"model_name": cpu_name(), "cores": os.cpu_count(), "bf16_flags": cpu_bf16_flags(),
            "flags": [flag for flag in SPEED_FLAGS if flag in flags]}


def resolve_precision(precision: str, accelerator: str) -> str:
    """The Lightning `precision` to train with; ConfigError when the device cannot do it.

    Args:
        precision: `train.precision` (32-true | bf16-mixed | 16-mixed | auto).
        accelerator: the resolved accelerator, 'cpu', 'cuda' or 'mps'.
    """
    if precision == "32-true":
        return precision
    if accelerator == "cuda":
        return _resolve_cuda(precision)
    if accelerator == "mps":
        return "32-true" if precision == "auto" else precision
    if precision == "16-mixed":
        raise ConfigError(KEY, "'16-mixed' needs a GPU (accelerator resolves to cpu here); on "
                               "CPU use bf16-mixed (CPUs with bf16 units), auto or 32-true")
    flags = cpu_bf16_flags()
    if flags:
        if precision == "auto":
            log.info("%s auto: bf16-mixed (CPU %s has %s)", KEY, cpu_name(), ", ".join(flags))
        return "bf16-mixed"
    if precision == "bf16-mixed":
        units = " or ".join(BF16_FLAGS)
        raise ConfigError(KEY, f"'bf16-mixed' needs a CPU with bf16 units ({units} in lscpu "
                               f"flags); this CPU ({cpu_name()}) has neither, so bf16 would be "
                               "emulated and slower than fp32; use 32-true or auto")
    log.warning("%s auto: this CPU (%s) has no bf16 units (%s), training in fp32 (32-true)",
                KEY, cpu_name(), " or ".join(BF16_FLAGS))
    return "32-true"


def _resolve_cuda(precision: str) -> str:
    bf16 = torch.cuda.is_bf16_supported()
    if precision == "bf16-mixed" and not bf16:
        raise ConfigError(KEY, "this GPU has no bf16; use 16-mixed, auto or 32-true")
    if precision == "auto":
        resolved = "bf16-mixed" if bf16 else "32-true"
        log.info("%s auto: %s (GPU %s bf16)", KEY, resolved, "has" if bf16 else "has no")
        return resolved
    return precision
