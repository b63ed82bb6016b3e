"""The format's quantization rule: uint8 codes of attention maps scaled by their 99th percentile.

``u8 = round(clip(x / vmax99, 0, 1) * 255)`` and back ``x = u8 / 255 * vmax99``. This module is the one
place the rule is written: the exporter encodes with it, the reader and the viewer decode with it, and
:mod:`vggt.device_quantize` computes the same bytes with torch for maps held on a GPU. numpy only.

``vmax99`` is the exact 99th percentile with numpy's default ('linear') interpolation. Finding it
does not sort the data: a strided sample gives a threshold just below the order statistics needed,
one pass keeps the values at or above it (about 1% of them), and a partial sort of those gives the
answer. Should the threshold land too high (possible only with a freak sample), a full selection
runs instead, so the result is exact in every case.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

UINT8_MAX = 255.0
# How maps are stored: uint8 codes of this rule, or the probabilities in float16.
PRECISIONS = ("uint8", "float16")
PERCENTILE = 99.0
VMAX_ESTIMATOR = "exact 99th percentile (numpy 'linear' interpolation)"

_SAMPLE_SIZE = 1 << 16
_SAMPLE_MARGIN = 200  # sample ranks below the target: ~8 standard deviations of the sampled rank
_CHUNK_VALUES = 1 << 18  # elements encoded at a time: the passes over them stay in cache
_SELECT_BLOCK = 1 << 18  # elements per block when selecting the top values
_TASK_BYTES = 1 << 20  # encoded bytes per task when a layer is encoded on several threads


def check_precision(precision: str) -> None:
    """A ``ValueError`` unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def worker_threads() -> int:
    """Threads for numpy work that releases the GIL: the cores this process may use, at most 8
    (beyond that, memory bandwidth rather than cores limits these passes)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


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
    if flat.size == 0:
        return 1.0
    lower_rank, upper_rank = percentile_ranks(flat.size)
    return interpolate_percentile(flat.size, *_order_statistics(flat, lower_rank, upper_rank))


def percentile_ranks(count: int) -> tuple[int, int]:
    """0-based ranks (in ascending order) of the two order statistics that the 99th percentile of
    ``count > 0`` values interpolates between."""
    lower_rank = math.floor(PERCENTILE / 100.0 * (count - 1))
    return lower_rank, min(lower_rank + 1, count - 1)


def interpolate_percentile(count: int, lower: float, upper: float) -> float:
    """The 99th percentile of ``count`` values from its two order statistics (see
    :func:`percentile_ranks`), interpolated linearly as ``np.percentile`` does."""
    position = PERCENTILE / 100.0 * (count - 1)
    return float(lower + (position - math.floor(position)) * (upper - lower))


def _order_statistics(flat: np.ndarray, lower_rank: int, upper_rank: int) -> tuple[float, float]:
    count = flat.size
    if count > 8 * _SAMPLE_SIZE:
        sample = flat[:: count // _SAMPLE_SIZE]
        at = math.floor(sample.size * lower_rank / count) - _SAMPLE_MARGIN
        if at > 0:
            top = _at_least(flat, np.partition(sample, at)[at])
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
        parts.append(block[np.flatnonzero(block_mask)])  # faster than boolean indexing for sparse masks
    return np.concatenate(parts)


class EncodedMaps:
    """A layer's maps in their stored dtype, encoded when asked for, a cache-sized block at a time.

    :meth:`encode_into` writes the codes into a buffer of the caller's (the exporter's write queue) on
    several threads; ``np.asarray`` gives them in a new array.

    Parameters
    ----------
    values : np.ndarray
        Float probabilities ``[Q, ...]``; read (not copied) until encoded.
    precision : str
        ``"uint8"``: ``round(clip(values / vmax99, 0, 1) * 255)``; ``"float16"``: the values cast.
    vmax99 : float or np.ndarray, optional
        The uint8 scale: a scalar, or broadcastable against ``values[0]`` (per head: ``[heads, 1, 1, 1]``
        for ``[Q, heads, S, H_ds, W_ds]`` values). A non-positive scale (an all-zero map) is taken as 1.
    """

    def __init__(
        self, values: np.ndarray, precision: str = "uint8", vmax99: float | np.ndarray | None = None
    ) -> None:
        check_precision(precision)
        self.values = np.asarray(values)
        if self.values.ndim == 0:
            raise ValueError("maps to encode need at least one axis")
        self.shape = self.values.shape
        self.dtype = np.dtype(np.uint8 if precision == "uint8" else np.float16)
        self._codes_per_unit = None
        if precision == "uint8":
            if vmax99 is None:
                raise ValueError("uint8 encoding needs a vmax99 scale")
            vmax = np.asarray(vmax99, dtype=np.float32)
            if vmax.ndim > max(self.values.ndim - 1, 0):
                raise ValueError(f"a scale of shape {vmax.shape} does not fit maps of shape {self.shape}")
            self._codes_per_unit = codes_per_unit(vmax)
        self._rows_per_step = min(max(1, _CHUNK_VALUES // max(1, math.prod(self.shape[1:]))), self.shape[0])
        self._scratch = threading.local()  # fill may run in several threads at once

    def _fill(self, start: int, stop: int, out: np.ndarray) -> None:
        """Encode rows ``[start, stop)`` into ``out`` (``[stop - start, *shape[1:]]`` of :attr:`dtype`);
        thread-safe for disjoint rows."""
        step = self._rows_per_step
        work = getattr(self._scratch, "work", None)
        if work is None and self._codes_per_unit is not None:
            work = self._scratch.work = np.empty((step, *self.shape[1:]), np.float32)
        for first in range(start, stop, step):
            last = min(first + step, stop)
            values, target = self.values[first:last], out[first - start : last - start]
            if self._codes_per_unit is None:
                target[...] = values
            else:
                target[...] = _quantize_block(values, self._codes_per_unit, work[: last - first])

    def encode_into(self, out: np.ndarray) -> np.ndarray:
        """Encode every row into ``out`` (C-contiguous, :attr:`shape` and :attr:`dtype`) on
        :func:`worker_threads` threads; returns ``out``."""
        if out.shape != self.shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"cannot encode {self.dtype} {self.shape} into {out.dtype} {out.shape}")
        rows = self.shape[0]
        rows_per_task = max(1, _TASK_BYTES // max(1, out[:1].nbytes))
        starts = range(0, rows, rows_per_task)
        if len(starts) <= 1:
            self._fill(0, rows, out)
            return out
        with ThreadPoolExecutor(min(len(starts), worker_threads())) as pool:
            for done in [
                pool.submit(
                    self._fill, start, min(start + rows_per_task, rows), out[start : start + rows_per_task]
                )
                for start in starts
            ]:
                done.result()
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        encoded = self.encode_into(np.empty(self.shape, self.dtype))
        return encoded if dtype is None else encoded.astype(dtype)


def quantize_uint8(values: np.ndarray, vmax99: float | np.ndarray) -> np.ndarray:
    """``round(clip(values / vmax99, 0, 1) * 255)`` as uint8 (see :class:`EncodedMaps`).

    Parameters
    ----------
    values : np.ndarray
        Float probabilities of any shape.
    vmax99 : float or np.ndarray
        The scale: a scalar, or broadcastable against ``values[0]`` (per head: ``[heads, 1, 1, 1]`` for
        ``[Q, heads, S, H_ds, W_ds]`` values). A non-positive scale (an all-zero layer) is taken as 1.
    """
    values = np.asarray(values)
    encoded = EncodedMaps(values.reshape(values.shape or (1,)), "uint8", vmax99)
    return np.asarray(encoded).reshape(values.shape)


def codes_per_unit(vmax99: np.ndarray) -> np.ndarray:
    """``255 / vmax99`` in float32, the factor every code is computed with (a non-positive scale
    counts as 1)."""
    vmax = np.asarray(vmax99, dtype=np.float32)
    return np.float32(UINT8_MAX) / np.where(vmax > 0, vmax, np.float32(1.0))


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
    return np.multiply(codes, dequantization_factor(vmax99), dtype=np.float32)


def dequantization_factor(vmax99: float | np.ndarray) -> np.ndarray:
    """``vmax99 / 255`` in float32: a code times this factor is the probability it stands for."""
    return np.asarray(vmax99, dtype=np.float32) / np.float32(UINT8_MAX)


def vmax99(values: np.ndarray) -> float:
    """The scale of a map: its 99th percentile, or its maximum when that is 0 (maps that are mostly
    zeros, as a rollout with discarding can be), or 1 for an all-zero map."""
    return scale_or_fallback(percentile99(values), lambda: float(np.max(values, initial=0.0)))


def scale_or_fallback(percentile: float, peak: Callable[[], float]) -> float:
    """The rule of :func:`vmax99` given the percentile and a way to find the maximum."""
    if percentile > 0:
        return percentile
    highest = peak()
    return highest if highest > 0 else 1.0


def encode_layer(
    maps: np.ndarray, precision: str = "uint8", head_mean: np.ndarray | None = None
) -> tuple[EncodedMaps, dict]:
    """Scales of one layer's pooled probabilities, and the maps encoded as the format stores them.

    Parameters
    ----------
    maps : np.ndarray
        float32 ``[Q, K, H_ds, W_ds]`` (averaged) or ``[Q, heads, K, H_ds, W_ds]`` (per head). Per head,
        ``maps[:, h]`` is best contiguous (head-major storage seen through a transposed view). Read
        when the result is encoded, so it must stay unchanged until then.
    precision : str
        ``"uint8"``: codes normalized by the layer's vmax99 (averaged) or each head's (per head);
        ``"float16"``: the raw probabilities.
    head_mean : np.ndarray, optional
        ``[Q, K, H_ds, W_ds]``, the maps averaged over heads, if already at hand (per head only).

    Returns
    -------
    heatmaps : EncodedMaps
        uint8 codes or float16 probabilities of the shape of ``maps``, encoded when written (or by
        ``np.asarray``).
    fields : dict
        ``layer_vmax99`` (scale of the head-averaged maps, see :func:`vmax99`), ``per_head_vmax99``,
        ``normalized_by`` and ``vmax_estimator`` for the layer's metadata.
    """
    check_precision(precision)
    per_head = maps.ndim == 5
    if head_mean is None:
        head_mean = maps.mean(axis=1, dtype=np.float32) if per_head else maps
    if precision == "float16" or not per_head:
        fields = scale_fields(precision, vmax99(head_mean))
        if precision == "float16":
            return EncodedMaps(maps, "float16"), fields
        return EncodedMaps(maps, "uint8", fields["layer_vmax99"]), fields
    # numpy releases the GIL: the scales are found in parallel.
    heads = maps.shape[1]
    with ThreadPoolExecutor(max_workers=min(heads + 1, worker_threads())) as pool:
        scales = list(pool.map(vmax99, [head_mean, *(maps[:, head] for head in range(heads))]))
    fields = scale_fields(precision, scales[0], scales[1:])
    return EncodedMaps(maps, "uint8", head_scales(fields, maps.ndim)), fields


def scale_fields(precision: str, layer_vmax99: float, per_head_vmax99: list[float] | None = None) -> dict:
    """A layer's metadata fields on its scales: ``layer_vmax99``, ``per_head_vmax99`` (per-head uint8
    only), ``normalized_by`` and ``vmax_estimator``."""
    normalized_by = "none" if precision == "float16" else "layer" if per_head_vmax99 is None else "head"
    return {
        "layer_vmax99": layer_vmax99,
        "per_head_vmax99": per_head_vmax99,
        "vmax_estimator": VMAX_ESTIMATOR,
        "normalized_by": normalized_by,
    }


def head_scales(fields: dict, ndim: int = 5) -> np.ndarray:
    """The per-head scales of :func:`scale_fields` as float32 ``[heads, 1, 1, 1]``, broadcasting
    against one query's ``[heads, K, H_ds, W_ds]`` of ``ndim``-axis maps ``[Q, heads, K, H_ds, W_ds]``."""
    scales = fields["per_head_vmax99"]
    return np.asarray(scales, dtype=np.float32).reshape(len(scales), *(1,) * (ndim - 2))
