"""uint8 quantization of attention maps by their 99th percentile (numpy only, no torch).

``u8 = round(clip(x / vmax99, 0, 1) * 255)`` and back ``x = u8 / 255 * vmax99``.

``vmax99`` is the exact 99th percentile with numpy's default ('linear') interpolation. Finding it
does not sort the data: a strided sample gives a threshold just below the order statistics needed,
one pass keeps the values at or above it (about 1% of them), and a partial sort of those gives the
answer. Should the threshold land too high (possible only with a freak sample), a full selection
runs instead, so the result is exact in every case.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

UINT8_MAX = 255.0
PERCENTILE = 99.0
VMAX_ESTIMATOR = "exact 99th percentile (numpy 'linear' interpolation)"

_SAMPLE_SIZE = 1 << 16
_SAMPLE_MARGIN = 400  # sample ranks below the target: ~8 standard deviations of the sampled rank
_CHUNK_VALUES = 1 << 16  # elements per block in quantize_uint8: its passes stay in cache
_SELECT_BLOCK = 1 << 18  # elements per block when selecting the top values


def percentile99(values: np.ndarray) -> float:
    """Exact 99th percentile (linear interpolation, as ``np.percentile``) of all values.

    Parameters
    ----------
    values : np.ndarray
        Floats of any shape; a contiguous array is read without copying.

    Returns
    -------
    float
        The percentile; ``1.0`` for an empty array, so that it can always serve as a scale.
    """
    flat = np.asarray(values).reshape(-1)
    count = flat.size
    if count == 0:
        return 1.0
    position = PERCENTILE / 100.0 * (count - 1)
    lower_rank = math.floor(position)
    upper_rank = min(lower_rank + 1, count - 1)
    lower, upper = _order_statistics(flat, lower_rank, upper_rank)
    return float(lower + (position - lower_rank) * (upper - lower))


def _order_statistics(flat: np.ndarray, lower_rank: int, upper_rank: int) -> tuple[float, float]:
    count = flat.size
    if count > 8 * _SAMPLE_SIZE:
        sample = np.sort(flat[:: count // _SAMPLE_SIZE])
        at = math.floor(sample.size * lower_rank / count) - _SAMPLE_MARGIN
        if at > 0:
            top = _at_least(flat, sample[at])
            below = count - top.size
            if below <= lower_rank:
                picked = np.partition(top, [lower_rank - below, upper_rank - below])
                return float(picked[lower_rank - below]), float(picked[upper_rank - below])
    picked = np.partition(flat, [lower_rank, upper_rank])
    return float(picked[lower_rank]), float(picked[upper_rank])


def _at_least(flat: np.ndarray, threshold: float) -> np.ndarray:
    """The values ``>= threshold``, selected a cache-sized block at a time through one reused mask
    (a mask of the whole array would be a fresh allocation, paid for in page faults)."""
    mask = np.empty(min(flat.size, _SELECT_BLOCK), dtype=bool)
    parts = []
    for start in range(0, flat.size, _SELECT_BLOCK):
        block = flat[start : start + _SELECT_BLOCK]
        block_mask = mask[: block.size]
        np.greater_equal(block, threshold, out=block_mask)
        parts.append(block[block_mask])
    return np.concatenate(parts)


def quantize_uint8(
    values: np.ndarray, vmax99: float | np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``round(clip(values / vmax99, 0, 1) * 255)`` as uint8, in cache-sized blocks.

    Parameters
    ----------
    values : np.ndarray
        Float probabilities of any shape.
    vmax99 : float or np.ndarray
        The scale, a scalar or broadcastable against ``values`` (per head: ``[heads, 1, 1, 1]`` for
        ``[Q, heads, S, H_ds, W_ds]`` values). A non-positive scale (an all-zero layer) is taken as 1.
    out : np.ndarray, optional
        uint8 array of the shape of ``values`` to write into; it may be a strided view, e.g. one head
        of a ``[Q, heads, ...]`` array.

    Returns
    -------
    np.ndarray
        ``out``, or a new uint8 array of the shape of ``values``.
    """
    values = np.asarray(values)
    vmax = np.asarray(vmax99, dtype=np.float32)
    codes_per_unit = np.float32(UINT8_MAX) / np.where(vmax > 0, vmax, np.float32(1.0)).astype(np.float32)
    if out is None:
        out = np.empty(values.shape, dtype=np.uint8)
    if values.ndim == 0 or codes_per_unit.ndim > values.ndim:
        work = np.empty(np.broadcast_shapes(values.shape, codes_per_unit.shape), np.float32)
        out[...] = _quantize_block(values, codes_per_unit, work)
        return out
    codes_per_unit = codes_per_unit.reshape((1,) * (values.ndim - codes_per_unit.ndim) + codes_per_unit.shape)
    rows_per_block = max(1, _CHUNK_VALUES // max(1, values[0].size))
    scratch = np.empty((rows_per_block, *values.shape[1:]), dtype=np.float32)
    for start in range(0, values.shape[0], rows_per_block):
        stop = min(start + rows_per_block, values.shape[0])
        block = codes_per_unit if codes_per_unit.shape[0] == 1 else codes_per_unit[start:stop]
        out[start:stop] = _quantize_block(values[start:stop], block, scratch[: stop - start])
    return out


def _quantize_block(values: np.ndarray, codes_per_unit: np.ndarray, work: np.ndarray) -> np.ndarray:
    # Three passes over a cache-sized block: x * (255 / vmax99), clip to [0, 255], round.
    np.multiply(values, codes_per_unit, out=work, dtype=np.float32)
    np.clip(work, 0.0, np.float32(UINT8_MAX), out=work)
    return np.rint(work, out=work)


def dequantize_uint8(codes: np.ndarray, vmax99: float | np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_uint8` up to rounding: ``codes / 255 * vmax99`` as float32.

    ``vmax99`` is a scalar or broadcasts against ``codes`` (per head: ``[heads, 1, 1, 1]`` for one
    query's ``[heads, S, H_ds, W_ds]`` maps).
    """
    scale = np.asarray(vmax99, dtype=np.float32) / np.float32(UINT8_MAX)
    return np.multiply(codes, scale, dtype=np.float32)


def vmax99(values: np.ndarray) -> float:
    """The scale of a map: its 99th percentile, or its maximum when that is 0 (maps that are mostly
    zeros, as a rollout with discarding can be), or 1 for an all-zero map."""
    scale = percentile99(values)
    if scale > 0:
        return scale
    peak = float(np.max(values, initial=0.0))
    return peak if peak > 0 else 1.0


def encode_layer(
    maps: np.ndarray,
    precision: str = "uint8",
    head_mean: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Encode one layer's pooled probabilities as the format stores them.

    Parameters
    ----------
    maps : np.ndarray
        float32 ``[Q, K, H_ds, W_ds]`` (averaged) or ``[Q, heads, K, H_ds, W_ds]`` (per head). Per head,
        ``maps[:, h]`` is best contiguous (head-major storage seen through a transposed view).
    precision : str
        ``"uint8"``: codes normalized by the layer's vmax99 (averaged) or each head's (per head);
        ``"float16"``: the raw probabilities.
    head_mean : np.ndarray, optional
        ``[Q, K, H_ds, W_ds]``, the maps averaged over heads, if already at hand (per head only).
    out : np.ndarray, optional
        Array of the shape of ``maps`` and the dtype of ``precision`` to write into (a reused buffer:
        memory touched for the first time costs page faults).

    Returns
    -------
    heatmaps : np.ndarray
        uint8 codes or float16 probabilities, the shape of ``maps`` (``out`` when given).
    fields : dict
        ``layer_vmax99`` (scale of the head-averaged maps, see :func:`vmax99`), ``per_head_vmax99``,
        ``normalized_by`` and ``vmax_estimator`` for the layer's metadata.
    """
    if precision not in ("uint8", "float16"):
        raise ValueError(f"precision must be 'uint8' or 'float16', got {precision!r}")
    per_head = maps.ndim == 5
    if head_mean is None:
        head_mean = maps.mean(axis=1, dtype=np.float32) if per_head else maps
    fields: dict = {
        "layer_vmax99": vmax99(head_mean),
        "per_head_vmax99": None,
        "vmax_estimator": VMAX_ESTIMATOR,
    }
    if precision == "float16":
        if out is None:
            return maps.astype(np.float16), fields | {"normalized_by": "none"}
        out[...] = maps
        return out, fields | {"normalized_by": "none"}
    if not per_head:
        return quantize_uint8(maps, fields["layer_vmax99"], out=out), fields | {"normalized_by": "layer"}
    codes = np.empty(maps.shape, dtype=np.uint8) if out is None else out

    def encode_head(head: int) -> float:
        scale = vmax99(maps[:, head])
        quantize_uint8(maps[:, head], scale, out=codes[:, head])
        return scale

    # numpy releases the GIL: the heads go in parallel, one thread per core.
    with ThreadPoolExecutor(max_workers=max(1, min(maps.shape[1], os.cpu_count() or 1))) as pool:
        head_vmax = list(pool.map(encode_head, range(maps.shape[1])))
    return codes, fields | {"per_head_vmax99": head_vmax, "normalized_by": "head"}
