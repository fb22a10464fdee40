"""Where a run computes: the device, the autocast dtype and the CPU threads, chosen once per run."""
from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}


def cuda_missing() -> str:
    """Why this process has no CUDA device; "" when it has one."""
    if torch.cuda.is_available():
        return ""
    if torch.version.cuda is None:
        return "this torch is built without CUDA"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # what Ray (or the user) handed this process
    return "no CUDA GPU is visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")


def gpus_unusable(name: str) -> str:
    """Why device `name` = auto gets the CPU in a process handed GPUs it cannot use (CUDA_VISIBLE_DEVICES
    names some, as Ray sets it for a GPU trial, but torch sees no CUDA); "" otherwise: CUDA is there, a
    device was named, or no GPU was handed (the CPU, as expected)."""
    return cuda_missing() if name == "auto" and os.environ.get("CUDA_VISIBLE_DEVICES") else ""


def pick_device(name: str) -> torch.device:
    """auto: CUDA where there is one, else the CPU; a CUDA device asked for by name must be there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is missing on this machine ({cuda_missing()}); "
                         "use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def cpu_has_native_bf16() -> bool:
    # Without AVX512-BF16 or AMX, bf16 on the CPU is emulated and several times slower than fp32.
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name in PRECISIONS:
        return PRECISIONS[name]
    if name != "auto":
        raise ValueError(f"precision must be auto, bf16 or fp32, got {name!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def set_threads(threads: int) -> int:
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True)  # keeps the memory format its maker chose
