"""Choosing the torch device and the autocast dtype to run the model with."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

from vggt.arguments import SpelledError, argument


class DeviceError(SpelledError, ValueError):
    """A device or dtype this machine cannot run (one line, naming the argument as the caller spells it)."""


_DTYPES: dict[str, torch.dtype | None] = {
    "float32": None,
    "fp32": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def select_device_and_dtype(
    device: str | None = None, dtype: str | None = None
) -> tuple[torch.device, torch.dtype | None]:
    """Pick the device and the autocast dtype.

    Parameters
    ----------
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``/``None`` (CUDA when available, else CPU).
    dtype
        ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"`` or
        ``"auto"``/``None``: on CUDA bfloat16 when the GPU's compute capability is 8 or more, else
        float16; on CPU float32.

    Returns
    -------
    device
        The torch device.
    dtype
        The autocast dtype, ``None`` for float32 without autocast.

    Raises
    ------
    DeviceError
        For an unknown device or dtype, a CUDA device that is not available, or bfloat16 on a GPU
        without bfloat16 support.
    """
    resolved = _select_device(device)
    return resolved, _select_dtype(dtype, resolved)


def _select_device(device: str | None) -> torch.device:
    name = "auto" if device is None else device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise DeviceError(
            f"unknown {argument('device', repr(device))}: use 'cpu', 'cuda', 'cuda:N' or 'auto'"
        )
    if resolved.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"{argument('device', repr(device))} was requested but CUDA is not available; "
            f"use {argument('device', 'cpu')}"
        )
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise DeviceError(f"device {device!r} does not exist: this machine has {count} CUDA device(s)")
    return resolved


def _select_dtype(dtype: str | None, device: torch.device) -> torch.dtype | None:
    name = "auto" if dtype is None else dtype.strip().lower()
    if name == "auto":
        if device.type != "cuda":
            return None
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if name not in _DTYPES:
        choices = ", ".join(repr(n) for n in [*_DTYPES, "auto"])
        raise DeviceError(f"unknown {argument('dtype', repr(dtype))}: use one of {choices}")
    chosen = _DTYPES[name]
    if chosen is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(
            f"this GPU ({device}) does not support bfloat16; use {argument('dtype', 'float16')} or float32"
        )
    return chosen


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """Autocast to ``dtype`` on ``device``, or a no-op context for ``None``/float32.

    Parameters
    ----------
    device
        Device the model runs on.
    dtype
        Autocast dtype from :func:`select_device_and_dtype`.

    Returns
    -------
    contextlib.AbstractContextManager
        ``torch.autocast(device.type, dtype=dtype)`` or ``contextlib.nullcontext()``.
    """
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def gpu_has_room(device: torch.device, needed_bytes: int, already_held: int = 0) -> bool:
    """Whether ``needed_bytes`` may be kept on GPU ``device`` beside the forward pass: at most
    ``already_held`` (what the caller holds there now and would give up) plus half its free memory.
    Always ``False`` for the CPU."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return needed_bytes <= already_held + free // 2
