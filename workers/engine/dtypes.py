"""Which device and precision the engine runs in, and why.

`auto` is float16 on CUDA, bfloat16 on a CPU with native bfloat16 arithmetic (AVX-512
BF16 or AMX: oneDNN's bf16 kernels then run at up to twice the float32 rate; on other
CPUs bf16 is emulated and slower than float32), float32 elsewhere. The precision report
(`ttspool bench --precision`, docs/PERF.md) is what says the half dtypes are sound.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .engine_error import EngineError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is not there."""
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"TTSPOOL_DEVICE={name} but no CUDA device is available")
    return device


def pick_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype for `name` (auto, float16, bfloat16, float32) on `device`, and why."""
    if name != "auto":
        return DTYPES[name], f"TTSPOOL_DTYPE={name}"
    if device.type == "cuda":
        return torch.float16, "auto: float16 on CUDA"
    if cpu_has_native_bf16():
        return torch.bfloat16, "auto: this CPU has native bfloat16 (AVX-512 BF16 or AMX)"
    return torch.float32, "auto: float32 on a CPU without native bfloat16"
