"""Device and dtype choice: what ``"auto"`` means here, and clear errors for what cannot work."""

from __future__ import annotations

import os

import torch

from workbench.errors import ModelLoadError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def available_devices() -> list[str]:
    """The devices a model can be placed on in this process, CPU first."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def supported_dtypes(device: str) -> list[str]:
    """The dtypes worth offering for ``device`` ("auto" first): bfloat16 only where the GPU has it."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        with torch.cuda.device(resolved):
            half = ["bfloat16", "float16"] if torch.cuda.is_bf16_supported() else ["float16"]
        return ["auto", *half, "float32"]
    if resolved.type == "mps":
        return ["auto", "float16", "float32"]
    return ["auto", "float32", "bfloat16", "float16"]


def device_capacity(device: str) -> int | None:
    """Total memory of ``device`` in bytes (physical RAM for the CPU), or None where it cannot be read."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return int(torch.cuda.mem_get_info(resolved)[1])
    if resolved.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError):
            return None
    return None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is the first CUDA device if there is one, else MPS, else the CPU."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        number = isinstance(device, int) and not isinstance(device, bool)
        example = f" (for GPU {device}, 'cuda:{device}')" if number else ""
        raise ModelLoadError(f"device must be a name such as 'cpu' or 'cuda:0', not {device!r}{example}",
                             hint=f"use 'auto' or one of: {', '.join(available_devices())}")
    name = device.strip().lower()
    if name == "auto":
        return torch.device(available_devices()[1] if len(available_devices()) > 1 else "cpu")
    if name == "cuda":
        name = "cuda:0"
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(
            f"unknown device {device!r}",
            hint=f"use 'auto' or one of: {', '.join(available_devices())}",
        ) from None
    if resolved.type == "cpu":
        return torch.device("cpu")
    if str(resolved) not in available_devices():
        raise ModelLoadError(
            f"device {device!r} is not available on this machine",
            hint=f"available: {', '.join(available_devices())} (or 'auto')",
        )
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` is bfloat16 on a CUDA device that supports it, float16 on other GPUs, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:  # else transformers refuses it, and the hint blamed the path
            raise ModelLoadError(f"dtype {dtype} is not a floating-point type, which a model's weights need",
                                 hint="use 'auto', 'float32', 'float16' or 'bfloat16'")
        return dtype
    if not isinstance(dtype, str):
        raise ModelLoadError(f"dtype must be a name such as 'float32', not {dtype!r}",
                             hint="use 'auto', 'float32', 'float16' or 'bfloat16'")
    name = dtype.strip().lower().removeprefix("torch.")
    if name == "auto":
        if device.type == "cuda":
            with torch.cuda.device(device):
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(
            f"unknown dtype {dtype!r}", hint="use 'auto', 'float32', 'float16' or 'bfloat16'"
        )
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
