"""Device and autocast dtype selection; CUDA is simulated where the machine has none."""

from __future__ import annotations

import contextlib

import pytest
import torch

from vggt.device import autocast_context, select_device_and_dtype


@pytest.fixture()
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture()
def fake_cuda(monkeypatch: pytest.MonkeyPatch):
    """Pretend two GPUs are present; returns a setter for their compute capability."""
    capability = {"value": (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: capability["value"][0] >= 8)

    def set_capability(major: int, minor: int = 0) -> None:
        capability["value"] = (major, minor)

    return set_capability


def test_cpu_default_is_float32_without_autocast(no_cuda) -> None:
    assert select_device_and_dtype() == (torch.device("cpu"), None)
    assert select_device_and_dtype("auto", "auto") == (torch.device("cpu"), None)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", None),
        ("fp32", None),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
    ],
)
def test_dtype_names(no_cuda, name, expected) -> None:
    assert select_device_and_dtype("cpu", name) == (torch.device("cpu"), expected)


def test_cuda_default_follows_compute_capability(fake_cuda) -> None:
    assert select_device_and_dtype() == (torch.device("cuda"), torch.bfloat16)
    fake_cuda(7, 5)
    assert select_device_and_dtype() == (torch.device("cuda"), torch.float16)
    assert select_device_and_dtype("cuda:1", "fp32") == (torch.device("cuda:1"), None)
    assert select_device_and_dtype("cpu") == (torch.device("cpu"), None)


def test_bf16_on_old_gpu_is_refused(fake_cuda) -> None:
    fake_cuda(7, 0)
    with pytest.raises(ValueError, match="does not support bfloat16"):
        select_device_and_dtype("cuda", "bf16")


@pytest.mark.parametrize(
    ("device", "dtype", "message"),
    [
        ("tpu9", None, "unknown device='tpu9'"),
        ("cuda:x", None, "unknown device='cuda:x'"),
        ("mps", None, "unknown device='mps'"),
        ("cpu", "float8", "unknown dtype='float8'"),
        ("cuda", None, "CUDA is not available"),
        ("cuda:0", "fp16", "CUDA is not available"),
    ],
)
def test_bad_values_raise_one_clear_line(no_cuda, device, dtype, message) -> None:
    with pytest.raises(ValueError, match=message) as info:
        select_device_and_dtype(device, dtype)
    assert "\n" not in str(info.value)


def test_missing_gpu_index(fake_cuda) -> None:
    with pytest.raises(ValueError, match="has 2 CUDA device"):
        select_device_and_dtype("cuda:5")


def test_autocast_context() -> None:
    cpu = torch.device("cpu")
    assert isinstance(autocast_context(cpu, None), contextlib.nullcontext)
    assert isinstance(autocast_context(cpu, torch.float32), contextlib.nullcontext)
    a = torch.randn(4, 4)
    with autocast_context(cpu, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    with autocast_context(cpu, None):
        assert (a @ a).dtype == torch.float32
