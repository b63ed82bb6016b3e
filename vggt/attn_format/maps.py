"""One query's maps read out of a layer's arrays: what an opened export and an in-memory capture share.

numpy only. A subclass of :class:`AttentionMaps` says what a layer holds (:meth:`layer_meta`), gives its
arrays as stored (:meth:`heatmaps`, ``_array``) and the factor that turns stored values into
probabilities (:meth:`head_scales`); the accessors here do the rest, with the same checks and shapes.
"""

from __future__ import annotations

import numpy as np

from vggt.attn_format.errors import FormatError
from vggt.attn_format.schema import HEATMAPS_KEY, TOKEN_HEATMAPS_KEY


class AttentionMaps:
    """Accessors of a layer's maps by query, token query and key cell (see the subclasses
    :class:`~vggt.attn_format.reader.AttnExport` and :class:`vggt.captured.CapturedAttention`)."""

    layer_names: list[str]

    def layer_meta(self, name: str) -> dict:
        raise NotImplementedError

    def heatmaps(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def _array(self, name: str, key: str) -> np.ndarray | None:
        raise NotImplementedError

    def head_scales(self, name: str, token: bool = False) -> np.ndarray:
        raise NotImplementedError

    def key_frames(self, name: str) -> list[int]:
        """The frames along a layer's K axis (all frames for global layers and the rollout, ``[0]``
        for frame and DINOv2 layers)."""
        return list(self.layer_meta(name)["key_frames"])

    def _check_head(self, meta: dict, head: int | None) -> int | None:
        if head is None:
            return None
        head = checked_index(head, "head index")
        if not meta["per_head_data"]:
            raise FormatError(f"layer {meta['layer_name']} has head-averaged maps only; no per-head data")
        if not 0 <= head < meta["num_heads"]:
            raise FormatError(f"head index {head} out of range 0..{meta['num_heads'] - 1}")
        return head

    def _dequantized_row(self, name: str, key: str, row: int, head: int | None) -> np.ndarray:
        meta = self.layer_meta(name)
        head = self._check_head(meta, head)
        token = key == TOKEN_HEATMAPS_KEY
        rows = len(meta["token_queries"]) if token else meta["Q"]
        row = checked_index(row, "token query" if token else "query index")
        if not 0 <= row < rows:
            what = "token query" if token else "query index"
            raise FormatError(f"{what} {row} out of range 0..{rows - 1} in layer {name}")
        stored = self._array(name, key)
        scales = self.head_scales(name, token)
        if not meta["per_head_data"]:
            return np.multiply(stored[row], scales[0], dtype=np.float32)
        if head is not None:
            return np.multiply(stored[row, head], scales[head], dtype=np.float32)
        return np.multiply(stored[row], scales[:, None, None, None], dtype=np.float32)

    def query_maps(self, name: str, qi: int, head: int | None = None) -> np.ndarray:
        """Dequantized maps of one query as float32 probabilities.

        Parameters
        ----------
        name : str
            Layer name.
        qi : int
            Query index ``qr * W_ds + qc``.
        head : int, optional
            0-based head; only for per-head layers.

        Returns
        -------
        np.ndarray
            ``[K, H_ds, W_ds]`` float32 for averaged data or a chosen head, else
            ``[heads, K, H_ds, W_ds]`` float32; K = the layer's :meth:`key_frames`.
        """
        return self._dequantized_row(name, HEATMAPS_KEY, qi, head)

    def token_maps(self, name: str, row: int, head: int | None = None) -> np.ndarray:
        """Dequantized maps of token query ``row`` (``layer_meta(name)["token_queries"][row]``, e.g.
        a frame's camera token), shaped like :meth:`query_maps`."""
        return self._dequantized_row(name, TOKEN_HEATMAPS_KEY, row, head)

    def key_maps(self, name: str, frame: int, row: int, col: int, head: int | None = None) -> np.ndarray:
        """Reverse view: how much each query sends to key cell ``(row, col)`` of ``frame``.

        Returns
        -------
        np.ndarray
            ``[H_ds, W_ds]`` float32 over the query grid for averaged data or a chosen head, else
            ``[heads, H_ds, W_ds]`` float32.
        """
        meta = self.layer_meta(name)
        head = self._check_head(meta, head)
        frame, row, col = (
            checked_index(v, what) for v, what in ((frame, "frame"), (row, "row"), (col, "column"))
        )
        if frame not in meta["key_frames"]:
            raise FormatError(
                f"layer {name} holds no attention to frame {frame} (key frames {meta['key_frames']})"
            )
        if not 0 <= row < meta["H_ds"] or not 0 <= col < meta["W_ds"]:
            raise FormatError(f"key cell (row {row}, col {col}) outside the export's grid")
        position = meta["key_frames"].index(frame)
        stored = self.heatmaps(name)
        scales = self.head_scales(name)
        grid = (meta["H_ds"], meta["W_ds"])
        if not meta["per_head_data"]:
            return np.multiply(stored[:, position, row, col], scales[0], dtype=np.float32).reshape(grid)
        if head is not None:
            return np.multiply(stored[:, head, position, row, col], scales[head], dtype=np.float32).reshape(
                grid
            )
        column = np.multiply(stored[:, :, position, row, col], scales[None, :], dtype=np.float32)
        return np.ascontiguousarray(column.T).reshape(meta["num_heads"], *grid)


def checked_index(value: object, what: str) -> int:
    """An index passed by a caller, as an ``int``; anything else is a :class:`FormatError`."""
    if isinstance(value, bool):
        raise FormatError(f"{what} must be an integer, got {value!r}")
    try:
        return int(value.__index__())  # type: ignore[union-attr]
    except (AttributeError, TypeError):
        raise FormatError(f"{what} must be an integer, got {type(value).__name__}") from None
