"""The format's quantization (:mod:`vggt.attn_format.quantization`) computed by torch, on the device
that holds the maps.

On a GPU a per-head layer is hundreds of MB of float32 maps; finding the scales and the codes there
sends only the codes (a quarter of the bytes) to the host, and keeps the host's cores out of it. The
results are the same as the format's ``encode_layer``, byte for byte: the same order statistics
(``torch.topk``), the same interpolation and fallback, the same float32 factor ``255 / vmax99``,
and rounding half to even as ``np.rint`` does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vggt.attn_format.quantization import (
    UINT8_MAX,
    check_precision,
    codes_per_unit,
    head_scales,
    interpolate_percentile,
    percentile_ranks,
    scale_fields,
    scale_or_fallback,
)

_BLOCK_VALUES = 1 << 24  # values quantized at a time: 64 MB of float32 scratch


class DeviceEncodedMaps:
    """A layer's maps encoded on their device; :meth:`encode_into` copies them to the host.

    Attributes
    ----------
    shape : tuple of int
    dtype : np.dtype
        ``uint8`` or ``float16``.
    """

    def __init__(self, encoded: Tensor) -> None:
        self._encoded = encoded
        self.shape = tuple(encoded.shape)
        self.dtype = np.dtype(str(encoded.dtype).removeprefix("torch."))

    def encode_into(self, out: np.ndarray) -> np.ndarray:
        """Copy the encoded maps into ``out`` (C-contiguous, :attr:`shape` and :attr:`dtype`); returns
        ``out``."""
        if out.shape != self.shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"cannot copy {self.dtype} {self.shape} into {out.dtype} {out.shape}")
        torch.from_numpy(out).copy_(self._encoded)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        encoded = self._encoded.cpu().numpy()
        return encoded if dtype is None else encoded.astype(dtype)


def vmax99_on_device(values: Tensor) -> float:
    """The format's ``vmax99`` of all of ``values`` (float32, any device; a flat view is best)."""
    flat = values.reshape(-1)
    count = flat.numel()
    if count == 0:
        return 1.0
    lower_rank, upper_rank = percentile_ranks(count)
    # The values from the lower order statistic up, largest first: about 1% of them. On a GPU this is
    # some 20 times faster than torch.kthvalue, which gives a row to a single thread block.
    top = torch.topk(flat, count - lower_rank, sorted=True).values
    lower, upper = top[-1].item(), top[-1 if upper_rank == lower_rank else -2].item()
    return scale_or_fallback(interpolate_percentile(count, lower, upper), lambda: flat.max().item())


def quantize_uint8_on_device(values: Tensor, vmax99: np.ndarray | float) -> Tensor:
    """``round(clip(values * (255 / vmax99), 0, 255))`` as uint8 on the values' device.

    ``vmax99`` broadcasts against ``values[0]`` as in the format's ``EncodedMaps``. Rows are done in
    blocks, so the float32 scratch stays small beside the forward pass.
    """
    factor = torch.from_numpy(np.asarray(codes_per_unit(vmax99))).to(values.device)
    codes = torch.empty(values.shape, dtype=torch.uint8, device=values.device)
    step = max(1, _BLOCK_VALUES // max(1, values[0].numel()))
    for first in range(0, values.shape[0], step):
        block = torch.mul(values[first : first + step], factor).clamp_(0.0, UINT8_MAX).round_()
        codes[first : first + step] = block
    return codes


def encode_layer_on_device(
    maps: Tensor, precision: str = "uint8", head_mean: Tensor | None = None
) -> tuple[DeviceEncodedMaps, dict]:
    """The format's ``encode_layer`` for maps held by torch (a GPU's), with the same results.

    Parameters
    ----------
    maps : Tensor
        float32 ``[Q, K, H_ds, W_ds]`` (averaged) or ``[Q, heads, K, H_ds, W_ds]`` (per head).
    precision : str
        ``"uint8"`` or ``"float16"``.
    head_mean : Tensor, optional
        ``[Q, K, H_ds, W_ds]``, the maps averaged over heads (per head only).

    Returns
    -------
    heatmaps : DeviceEncodedMaps
        uint8 codes or float16 probabilities of the shape of ``maps``, on the device.
    fields : dict
        ``layer_vmax99``, ``per_head_vmax99``, ``normalized_by`` and ``vmax_estimator``.
    """
    check_precision(precision)
    per_head = maps.dim() == 5
    if head_mean is None:
        head_mean = maps.mean(dim=1) if per_head else maps
    layer_vmax = vmax99_on_device(head_mean)
    if precision == "float16" or not per_head:
        fields = scale_fields(precision, layer_vmax)
        encoded = maps.half() if precision == "float16" else quantize_uint8_on_device(maps, layer_vmax)
        return DeviceEncodedMaps(encoded), fields
    # One head at a time: maps[:, h] of head-major storage flattens without a copy.
    head_vmax = [vmax99_on_device(maps[:, head]) for head in range(maps.shape[1])]
    fields = scale_fields(precision, layer_vmax, head_vmax)
    return DeviceEncodedMaps(quantize_uint8_on_device(maps, head_scales(fields, maps.dim()))), fields
