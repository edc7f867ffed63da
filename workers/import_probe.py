"""Import what a worker needs, one module at a time, and describe the devices torch sees.

Run as `python -m workers.import_probe DEVICE DTYPE` by `ttspool doctor` (and so by the
bootstrap's smoke step). It runs in its own process because a broken native library can
take the interpreter down with it (a segfault or abort inside torch's loader); the parent
then still knows which import was under way from the last line printed.

Prints JSON lines: {"importing": module}, then {"module", "version"} once it imported, or
{"module", "version", "error"}; then {"devices": {...}} when every import worked.
"""

from __future__ import annotations

import importlib
import json
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# In the order a worker imports them: each needs the ones before it.
MODULES = (("torch", "torch"), ("torchaudio", "torchaudio"), ("ChatTTS", "chattts"),
           ("celery_batches", "celery-batches"))


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _devices(device: str, dtype: str) -> dict[str, Any]:
    import torch

    from workers.engine.dtypes import cpu_flags, pick_device, pick_dtype

    cuda = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        cuda.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}"})
    driver = None
    if cuda:
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # nvidia-ml-py is optional; its errors are its own classes
            driver = None
    flags = cpu_flags()
    out: dict[str, Any] = {"cuda": cuda, "driver": driver, "cuda_runtime": torch.version.cuda,
                           "threads": torch.get_num_threads(),
                           "cpu": {"AVX-512": "avx512f" in flags, "AVX-512 BF16": "avx512_bf16" in flags,
                                   "AVX-512 VNNI": "avx512_vnni" in flags, "AMX": "amx_bf16" in flags}}
    try:
        chosen = pick_device(device)
        chosen_dtype, why = pick_dtype(dtype, chosen)
        out["device"] = str(chosen)
        out["dtype"] = str(chosen_dtype).removeprefix("torch.")
        out["dtype_reason"] = why
    except Exception as err:  # EngineError: the settings ask for what this machine lacks
        out["error"] = str(err)
    return out


def main(argv: list[str]) -> int:
    device, dtype = (argv + ["auto", "auto"])[:2]
    for module, dist in MODULES:
        _emit({"importing": module})
        try:
            importlib.import_module(module)
        except Exception as err:  # anything a broken install raises: OSError, ImportError, ...
            first = (str(err).strip().splitlines() or [""])[0]
            _emit({"module": module, "version": _version(dist),
                   "error": f"{type(err).__name__}: {first}"[:300]})
            return 1
        _emit({"module": module, "version": _version(dist)})
    _emit({"devices": _devices(device, dtype)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
