"""The torch quantizer (used for maps on a GPU) gives numpy's scales and codes, byte for byte.

Run here on CPU tensors; tests/test_cuda.py runs the same comparison on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vggt import device_quantize
from vggt.attn_format.quantization import codes_per_unit, encode_layer, vmax99
from vggt.device_quantize import encode_layer_on_device


def attention_like(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """float32 maps with a heavy upper tail, many exact zeros, and values on exact half codes."""
    rng = np.random.default_rng(seed)
    maps = (rng.random(shape, dtype=np.float32) ** 6 * 1e-2).astype(np.float32)
    maps[rng.random(shape) < 0.2] = 0.0
    return maps


def assert_same_encoding(maps: np.ndarray, precision: str, device: str, head_mean: np.ndarray | None = None):
    want, want_fields = encode_layer(maps, precision, head_mean)
    on_device = torch.from_numpy(maps).to(device)
    mean = None if head_mean is None else torch.from_numpy(head_mean).to(device)
    got, got_fields = encode_layer_on_device(on_device, precision, mean)
    assert got_fields == want_fields
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
    np.testing.assert_array_equal(got.encode_into(np.empty(got.shape, got.dtype)), np.asarray(want))


def half_codes(maps: np.ndarray) -> np.ndarray:
    """``maps`` with some of its lower values replaced by values that land exactly on ``k + 0.5`` codes
    (ties, which must round to even); its 99th percentile is unchanged."""
    factor = codes_per_unit(vmax99(maps))
    ties = []
    for code in range(100):
        x = np.float32((code + 0.5) / float(factor))
        for candidate in (x, np.nextafter(x, np.float32(0)), np.nextafter(x, np.float32(1))):
            if np.float32(candidate * factor) == code + 0.5:
                ties.append(candidate)
                break
    assert len(ties) >= 50
    flat = maps.reshape(-1)
    low = np.flatnonzero(flat < np.float32(0.4) * vmax99(maps))[: len(ties)]
    flat[low] = ties
    return maps


@pytest.mark.parametrize("precision", ["uint8", "float16"])
def test_averaged_layer_matches_numpy(precision):
    assert_same_encoding(half_codes(attention_like((60, 3, 8, 8), seed=0)), precision, "cpu")


@pytest.mark.parametrize("precision", ["uint8", "float16"])
@pytest.mark.parametrize("block_values", [1 << 24, 1000], ids=["one block", "blocks of rows"])
def test_per_head_layer_matches_numpy(precision, block_values, monkeypatch):
    monkeypatch.setattr(device_quantize, "_BLOCK_VALUES", block_values)
    maps = attention_like((4, 60, 3, 8, 8), seed=1)  # head-major storage, as the capture keeps it
    maps[2] = half_codes(maps[2])
    per_head = maps.transpose(1, 0, 2, 3, 4)
    head_mean = per_head.mean(axis=1, dtype=np.float32)
    assert_same_encoding(per_head, precision, "cpu", head_mean)


def test_scale_fallbacks_match_numpy():
    mostly_zero = np.zeros((40, 2, 3, 3, 3), np.float32)
    mostly_zero[0, 0, 0, 0, 0] = 0.25  # 99th percentile 0: the maximum is the scale
    assert_same_encoding(mostly_zero, "uint8", "cpu", mostly_zero.mean(axis=1))
    _, fields = encode_layer_on_device(torch.zeros(5, 2, 3, 3))
    assert fields["layer_vmax99"] == 1.0
