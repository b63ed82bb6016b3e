"""Synthetic exports with the real format and exact probabilities, for tests, demos and benchmarks.

The maps are not a model's: each query spreads its attention as a Gaussian blob around "its" patch in
every frame (shifted per frame, wider in early layers, different per head) plus the special tokens.
They are probabilities over the whole sequence nevertheless, pooled exactly as the exporter pools, so
pooled maps plus special-token mass sum to 1 per query and head.

Every layer kind of the format can be written (``kinds`` and ``rollout``): global layers attend over
all frames, frame and DINOv2 layers within frame 0 only (one key frame, the class token ``cls`` first
among a DINOv2 layer's special tokens), and each layer holds its token queries (every frame's camera
token in global layers and the rollout, frame 0's camera or class token in the others) as broad blobs.
The synthetic ``rollout`` is a stand-in with the rollout's metadata: head-averaged blobs whose rows sum
to 1, as a rollout with discard ratio 0 does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vggt.attn_format import ExportWriter, layer_name, query_grid_shape, special_token_names
from vggt.attn_format.geometry import TRACK_VISIBILITY_THRESHOLD
from vggt.attn_format.grid import cell_centres, in_frame, query_patches
from vggt.attn_format.quantization import encode_layer
from vggt.attn_format.schema import ROLLOUT_KIND
from vggt.attn_format.writer import layer_fields
from vggt.geometry.correspondence import geometry_meta, predicted_correspondences
from vggt.geometry.scene import Camera, unproject

_QUERY_CHUNK = 256


def synthetic_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Colourful, distinguishable test frames.

    Returns
    -------
    np.ndarray
        ``[S, H, W, 3] uint8``: a diagonal gradient, a checkerboard of patch-sized squares and a
        per-frame tint.
    """
    rng = np.random.default_rng(seed)
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width, dtype=np.float32)[None, :]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    checker = ((rows // 14 + cols // 14) % 2) * 40.0
    for index in range(num_frames):
        tint = rng.uniform(40, 200, size=3)
        ramp = (rows / max(height - 1, 1) + cols / max(width - 1, 1)) * 50.0
        frame = np.stack([tint[c] + ramp + checker for c in range(3)], axis=-1)
        frames[index] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def pooled_probabilities(
    H_p: int,
    W_p: int,
    stride_h: int,
    stride_w: int,
    num_frames: int,
    num_heads: int,
    layer: int,
    n_special: int,
    query_rows: np.ndarray,
    query_cols: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of a chunk of queries over all tokens, pooled onto the key grid.

    Parameters
    ----------
    query_rows, query_cols : np.ndarray
        ``[q]`` patch coordinates of the queries.

    Returns
    -------
    pooled : np.ndarray
        ``[q, heads, S, H_ds, W_ds]`` float32.
    special : np.ndarray
        ``[q, heads, S, n_special]`` float32; ``pooled`` and ``special`` sum to 1 per query and head.
    """
    H_ds, W_ds = query_grid_shape(H_p, W_p, stride_h, stride_w)
    count = query_rows.shape[0]
    key_rows = np.arange(H_p, dtype=np.float32)
    key_cols = np.arange(W_p, dtype=np.float32)
    width = (0.8 + 2.5 * np.exp(-layer / 4.0) + np.arange(num_heads)[:, None] * 0.3).astype(np.float32)
    shift = np.arange(num_frames, dtype=np.float32) * (1.0 + 0.1 * layer)
    # Separable Gaussian blob: [q, heads, S, H_p] x [q, heads, S, W_p].
    spread = width[None, :, :, None]
    row_term = np.exp(-0.5 * ((key_rows - query_rows[:, None, None, None]) / spread) ** 2)
    col_shift = query_cols[:, None, None, None] + shift[None, None, :, None]
    col_term = np.exp(-0.5 * ((key_cols - col_shift) / spread) ** 2)
    patch_logits = row_term[..., :, None] * col_term[..., None, :]
    patch_logits += rng.random(patch_logits.shape, dtype=np.float32) * np.float32(0.05)
    special = rng.uniform(0.05, 1.0, size=(count, num_heads, num_frames, n_special)).astype(np.float32)
    special[..., 0] *= 2.0 + layer % 3  # the camera token draws more than a register
    total = patch_logits.sum(axis=(-3, -2, -1)) + special.sum(axis=(-2, -1))  # [q, heads]
    patch_logits /= total[..., None, None, None]
    special /= total[..., None, None]
    if stride_h == 1 and stride_w == 1:
        return patch_logits, special
    pad_h, pad_w = H_ds * stride_h - H_p, W_ds * stride_w - W_p
    padded = np.pad(patch_logits, [(0, 0)] * 3 + [(0, pad_h), (0, pad_w)])
    pooled = padded.reshape(count, num_heads, num_frames, H_ds, stride_h, W_ds, stride_w).sum(axis=(4, 6))
    return pooled.astype(np.float32), special


def _chunked_probabilities(
    grid: tuple[int, int, int, int],
    key_frames: int,
    num_heads: int,
    layer: int,
    n_special: int,
    query_rows: np.ndarray,
    query_cols: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pooled_probabilities` of many queries, a chunk at a time.

    Parameters
    ----------
    grid : tuple of int
        ``(H_p, W_p, stride_h, stride_w)``.

    Returns
    -------
    pooled : np.ndarray
        ``[q, heads, K, H_ds, W_ds]`` float32.
    special : np.ndarray
        ``[q, heads, K, n_special]`` float32.
    """
    H_p, W_p, stride_h, stride_w = grid
    H_ds, W_ds = query_grid_shape(H_p, W_p, stride_h, stride_w)
    count = query_rows.shape[0]
    pooled = np.empty((count, num_heads, key_frames, H_ds, W_ds), dtype=np.float32)
    special = np.empty((count, num_heads, key_frames, n_special), dtype=np.float32)
    for start in range(0, count, _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, count)
        pooled[start:stop], special[start:stop] = pooled_probabilities(
            H_p, W_p, stride_h, stride_w, key_frames, num_heads, layer, n_special,
            query_rows[start:stop], query_cols[start:stop], rng,
        )  # fmt: skip
    return pooled, special


def synthetic_geometry(
    num_frames: int, H_p: int, W_p: int, stride_h: int, stride_w: int, patch_size: int = 14
) -> dict[str, np.ndarray]:
    """The arrays of a ``geometry/`` part for a plane seen by cameras moving sideways.

    The truth moves every query point one patch to the right per frame (where the synthetic maps of the
    first layer put their blobs); the predicted depth is 10% too far, so the points given by depth and
    cameras move 1/1.1 patch per frame; the track head's points are the truth shifted by (+3, -2)
    pixels, with a visibility score below the threshold for the last query in the last frame.

    Returns
    -------
    dict
        The members of :data:`vggt.attn_format.geometry.ARRAY_SPECS`, all three sources included.
    """
    height, width = H_p * patch_size, W_p * patch_size
    points = cell_centres(H_p, W_p, stride_h, stride_w, patch_size)
    focal, plane_depth = float(width), 2.0
    baseline = patch_size * plane_depth / focal  # one patch of image motion per frame
    camera_matrix = [[focal, 0, (width - 1) / 2], [0, focal, (height - 1) / 2], [0, 0, 1]]
    intrinsic = np.repeat(np.array([camera_matrix], np.float32), num_frames, axis=0)
    frames = np.arange(num_frames)
    extrinsic = np.zeros((num_frames, 3, 4), np.float32)
    extrinsic[:, :, :3] = np.eye(3, dtype=np.float32)
    extrinsic[:, 0, 3] = frames * baseline
    predicted_depth = np.full((num_frames, height, width), plane_depth * 1.1, np.float32)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    world_points = np.stack(
        [
            unproject(cols, rows, predicted_depth[s], Camera(intrinsic[s], extrinsic[s], width, height))
            for s in frames
        ]
    )
    truth_xy = points[None] + np.stack([frames * patch_size, 0 * frames], axis=-1)[:, None, :]
    truth_xy = truth_xy.astype(np.float32)
    track_xy = truth_xy + np.float32([3, -2])
    track_visibility = np.full(truth_xy.shape[:2], 0.9, np.float32)
    track_visibility[-1, -1] = 0.1
    depth_xy, depth_visible = predicted_correspondences(points, predicted_depth, extrinsic, intrinsic)
    return {
        "extrinsic": extrinsic,
        "intrinsic": intrinsic,
        "depth": predicted_depth,
        "depth_conf": np.full(predicted_depth.shape, 2.0, np.float32),
        "world_points": world_points,
        "world_points_conf": np.full(predicted_depth.shape, 3.0, np.float32),
        "query_points": points,
        "truth_xy": truth_xy,
        "truth_visible": in_frame(truth_xy, (height, width)),
        "track_xy": track_xy,
        "track_visible": in_frame(track_xy, (height, width))
        & (track_visibility >= TRACK_VISIBILITY_THRESHOLD),
        "track_visibility": track_visibility,
        "track_confidence": np.full(truth_xy.shape[:2], 0.8, np.float32),
        "depth_xy": depth_xy,
        "depth_visible": depth_visible,
    }


def write_synthetic_export(
    root: Path,
    num_frames: int = 3,
    H_p: int = 4,
    W_p: int = 5,
    stride_h: int = 1,
    stride_w: int = 1,
    num_layers: int = 2,
    num_heads: int = 4,
    per_head: bool = False,
    precision: str = "uint8",
    compress: bool = False,
    n_special: int = 5,
    random_weights: bool = True,
    seed: int = 0,
    kinds: tuple[str, ...] = ("global",),
    rollout: bool = False,
    rollout_discard: float = 0.9,
    token_queries: bool = True,
    geometry: bool = False,
) -> Path:
    """Write a complete export folder at ``root`` and return ``root``.

    Per-head uint8 exports are head-normalized; averaged uint8 exports layer-normalized; float16 raw.

    Parameters
    ----------
    kinds : tuple of str
        Layer kinds, ``num_layers`` layers of each, from ``"global"``, ``"frame"`` and ``"dino"``. Layers
        are named ``layer_01``... when the only kind is global (as the exporter names them), else
        ``global_01``, ``frame_01``, ``dino_01``...
    rollout : bool
        Also write the layer ``rollout`` (head-averaged even in a per-head export) with
        ``rollout_discard`` as its discard ratio.
    token_queries : bool
        Write each layer's token queries (``token_heatmaps``, ``token_special_mass``), as the exporter
        does; without them the layers look like those of an export without token maps.
    geometry : bool
        Also write a ``geometry/`` part (:func:`synthetic_geometry`).
    """
    rng = np.random.default_rng(seed)
    token_rng = np.random.default_rng([seed, 1])  # token maps do not change the patch maps' draws
    patch = 14
    height, width = H_p * patch, W_p * patch
    grid = (H_p, W_p, stride_h, stride_w)
    writer = ExportWriter(root, compress=compress)
    sources = [f"view_{index:03d}.png" for index in range(num_frames)]
    writer.write_frames(synthetic_frames(num_frames, height, width, seed), sources)
    query_rows, query_cols = (axis.astype(np.float32) for axis in query_patches(*grid))
    base_meta = {"H_p": H_p, "W_p": W_p, "stride_h": stride_h, "stride_w": stride_w, "num_heads": num_heads}

    def write(kind: str, layer: int, heads_kept: bool, extra: dict | None = None) -> None:
        """One layer: patch queries' and token queries' maps, over all frames or frame 0 only."""
        key_frames = num_frames if kind in ("global", ROLLOUT_KIND) else 1
        heads = num_heads if kind != ROLLOUT_KIND else 1
        pooled, special = _chunked_probabilities(
            grid, key_frames, heads, layer, n_special, query_rows, query_cols, rng
        )
        token_frames = list(range(num_frames)) if key_frames > 1 else [0]
        # A special token attends broadly (early-layer width), centred differently for each frame's token.
        centres = (np.asarray(token_frames, np.float32) + 1.0) * W_p / (len(token_frames) + 1.0)
        token_pooled, token_special = _chunked_probabilities(
            grid, key_frames, heads, -4, n_special,
            np.full(len(token_frames), (H_p - 1) / 2.0, np.float32), centres, token_rng,
        )  # fmt: skip
        if not heads_kept:
            pooled, special = pooled.mean(axis=1), special.mean(axis=1)
            token_pooled, token_special = token_pooled.mean(axis=1), token_special.mean(axis=1)
        heatmaps, fields = encode_layer(pooled, precision)
        token_arrays, token_fields = {}, None
        if token_queries:
            token_heatmaps, token_fields = encode_layer(token_pooled, precision)
            token_arrays = {
                "token_heatmaps": np.asarray(token_heatmaps),
                "token_special_mass": token_special.astype(np.float16),
            }
        number = layer + 1 if kind != ROLLOUT_KIND else None
        tokens = special_token_names(n_special, "cls" if kind == "dino" else "camera")
        meta = base_meta | (extra or {})
        meta |= layer_fields(
            kind, number, key_frames, tokens, token_frames if token_queries else [], fields, token_fields
        )
        name = layer_name(kind, number, kinds)
        writer.write_layer(name, np.asarray(heatmaps), special.astype(np.float16), meta, **token_arrays)

    for kind in kinds:
        for layer in range(num_layers):
            write(kind, layer, per_head)
    if rollout:
        meta = {"rollout_discard_ratio": float(rollout_discard), "rollout_layers": 2 * num_layers}
        write(ROLLOUT_KIND, num_layers, False, meta)
    if geometry:
        writer.write_geometry(synthetic_geometry(num_frames, *grid), geometry_meta(None))
    model = {"id": "synthetic", "random_weights": random_weights, "random_seed": seed}
    writer.write_manifest({"image_set_name": "synthetic", "model": model, "preprocess_mode": "crop"})
    return root
