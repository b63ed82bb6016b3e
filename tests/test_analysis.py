"""The attention analysis against float64 brute force, written from the definitions in docs/analysis.md
with plain loops over queries, on small exports written with the format's writer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from vggt.analysis import COLUMNS, AnalysisError, Correspondence, analyze, resolve_reference, run_analysis
from vggt.attn_format import ExportWriter, open_export, query_grid_shape, special_token_names
from vggt.attn_format.grid import cell_centres
from vggt.attn_format.quantization import encode_layer
from vggt.testing.synthetic import synthetic_frames, write_synthetic_export

MASSES = (0.3, 0.5, 0.7)


# ---- brute force ----------------------------------------------------------------------------------------


def _fork_mask(values: np.ndarray, fraction: float) -> np.ndarray:
    """The seed fork's mass-preserving mask: the largest values until their running sum reaches the
    fraction of the total; every value at least the one reached is in (ties included)."""
    flat = values.reshape(-1).astype(np.float64)
    total = flat.sum()
    if total <= 0:
        return np.zeros(values.shape, dtype=bool)
    order = np.argsort(flat)[::-1]
    running = np.cumsum(flat[order])
    cut = int(np.searchsorted(running, fraction * total, side="left"))
    if cut >= flat.size:
        return np.ones(values.shape, dtype=bool)
    return values >= flat[order[cut]]


def _fork_recall_tnr(reference: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    ref, pred = reference.reshape(-1), mask.reshape(-1)
    tp, fn = np.sum(ref & pred), np.sum(ref & ~pred)
    tn, fp = np.sum(~ref & ~pred), np.sum(~ref & pred)
    return (tp / (tp + fn) if tp + fn else 1.0), (tn / (tn + fp) if tn + fp else 1.0)


def _smallest_share(values: np.ndarray, share: float) -> float:
    flat = np.sort(values.reshape(-1).astype(np.float64))[::-1]
    total = flat.sum()
    if total <= 0:
        return math.nan
    running = np.cumsum(flat)
    return (int(np.argmax(running >= share * total)) + 1) / flat.size


def _rows_of(export, name):
    """Every row of a layer as brute force sees it: {head label: (stored-unit maps [Q, K, H_ds, W_ds] float64,
    probability scale, special [Q, K, n] float64 or None)}."""
    meta = export.layer_meta(name)
    stored = np.asarray(export.heatmaps(name)).astype(np.float64)
    special = export.special_mass(name)
    special = None if special is None else np.asarray(special).astype(np.float64)
    scales = export.head_scales(name).astype(np.float64)
    if not meta["per_head_data"]:
        return {"avg": (stored, scales[0], special)}
    heads = stored.shape[1]
    average = sum(stored[:, h] * scales[h] for h in range(heads)) / heads
    rows = {"avg": (average, 1.0, None if special is None else special.mean(axis=1))}
    for h in range(heads):
        rows[str(h + 1)] = (stored[:, h], scales[h], None if special is None else special[:, h])
    return rows


def brute_force(export, name, head, targets, reference, radius=1, scope="query", masses=MASSES):
    """Every column of one table row, and its per-query values, from the definitions."""
    maps, scale, special = _rows_of(export, name)[head]
    key_frames = export.key_frames(name)
    Q, K = maps.shape[:2]
    probs = maps * scale
    per_query = {k: np.full(Q, np.nan) for k in COLUMNS if k not in ("layer", "head", "corr_source")}
    pairs = {r: [] for r in (0, 1, 2)}
    corr_pairs = []
    qf = key_frames.index(0)
    ref_maps = _rows_of(export, reference)["avg"]
    ref_probs = ref_maps[0] * ref_maps[1]
    ref_frames = export.key_frames(reference)
    shared = [f for f in key_frames if f in ref_frames]
    for q in range(Q):
        per_query["query_frame_mass"][q] = probs[q, qf].sum()
        others = [p for p in range(K) if p != qf]
        if others:
            per_query["cross_view_mass"][q] = probs[q, others].sum()
        entries = probs[q].reshape(-1)
        if special is not None:
            per_query["camera_mass"][q] = special[q, :, 0].sum()
            per_query["register_mass"][q] = special[q, :, 1:].sum()
            entries = np.concatenate([entries, special[q].reshape(-1)])
        p = entries / entries.sum()
        per_query["entropy"][q] = -np.sum(p[p > 0] * np.log(p[p > 0])) / np.log(entries.size)
        per_query["cells_50"][q] = _smallest_share(maps[q], 0.5)
        per_query["cells_90"][q] = _smallest_share(maps[q], 0.9)
        if targets is not None:
            for position in others:
                frame = key_frames[position]
                if not targets["valid"][frame, q]:
                    continue
                tr, tc = targets["rows"][frame, q], targets["cols"][frame, q]
                cells = maps[q, position]
                rr, cc = np.indices(cells.shape)
                distance = np.maximum(np.abs(rr - tr), np.abs(cc - tc))
                peaks = cells == cells.max()
                for r in (0, 1, 2):
                    pairs[r].append((peaks & (distance <= r)).sum() / peaks.sum())
                if cells.sum() > 0:
                    corr_pairs.append(cells[distance <= radius].sum() / cells.sum())
        if scope == "query":
            mine = maps[q, [key_frames.index(f) for f in shared]]
            theirs = ref_probs[q, [ref_frames.index(f) for f in shared]]
            scores = [_fork_recall_tnr(_fork_mask(theirs, m), _fork_mask(mine, m)) for m in masses]
            per_query["mask_recall"][q] = np.mean([s[0] for s in scores])
            per_query["mask_tnr"][q] = np.mean([s[1] for s in scores])
    record = {k: (float(np.nanmean(v)) if np.isfinite(v).any() else math.nan) for k, v in per_query.items()}
    for r in (0, 1, 2):
        record[f"pck_{r}"] = float(np.mean(pairs[r])) if pairs[r] else math.nan
    record["corr_mass"] = float(np.mean(corr_pairs)) if corr_pairs else math.nan
    if scope == "all":
        mine = maps[:, [key_frames.index(f) for f in shared]]
        theirs = ref_probs[:, [ref_frames.index(f) for f in shared]]
        scores = [_fork_recall_tnr(_fork_mask(theirs, m), _fork_mask(mine, m)) for m in masses]
        record["mask_recall"] = float(np.mean([s[0] for s in scores]))
        record["mask_tnr"] = float(np.mean([s[1] for s in scores]))
    return record, per_query


# ---- exports and positions ------------------------------------------------------------------------------


def _positions(export, seed=0):
    """Positions of every query's point: shifted per frame, some hidden, some off the frame."""
    meta = export.layer_meta(export.layer_names[0])
    grid = (meta["H_p"], meta["W_p"], meta["stride_h"], meta["stride_w"])
    points = cell_centres(*grid).astype(np.float64)
    rng = np.random.default_rng(seed)
    S = meta["S"]
    xy = np.stack([points + rng.uniform(-20, 20, size=points.shape) * (f > 0) for f in range(S)])
    visible = rng.random((S, points.shape[0])) > 0.2
    xy[1, :3] = [-50.0, 10.0]  # off the frame (still "visible" in the data: the nearest cell takes it)
    return Correspondence("truth", xy.astype(np.float32), visible)


def _targets(export, correspondence):
    from vggt.attn_format.grid import cell_of_pixel

    meta = export.layer_meta(export.layer_names[0])
    rows, cols = cell_of_pixel(
        correspondence.xy, meta["H_p"], meta["W_p"], meta["stride_h"], meta["stride_w"]
    )
    valid = correspondence.visible.copy()
    valid[0] = False
    return {"rows": rows, "cols": cols, "valid": valid}


def _assert_row(actual: dict, expected: dict, rtol: float = 1e-9) -> None:
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(actual[key]), (key, actual[key])
        else:
            assert actual[key] == pytest.approx(value, rel=rtol, abs=1e-12), key


def _check_every_row(export, result, correspondence, scope="query", radius=1, masses=MASSES):
    targets = _targets(export, correspondence) if correspondence is not None else None
    reference = result.summary["options"]["reference_layer"]
    records = {(r["layer"], r["head"]): (i, r) for i, r in enumerate(result.records)}
    checked = 0
    for name in export.layer_names:
        for head in _rows_of(export, name):
            index, record = records[(name, head)]
            expected, per_query = brute_force(export, name, head, targets, reference, radius, scope, masses)
            _assert_row(record, expected)
            for key in ("cross_view_mass", "query_frame_mass", "camera_mass", "register_mass", "entropy"):
                np.testing.assert_allclose(
                    result.per_query[key][index], per_query[key], rtol=1e-5, equal_nan=True
                )
            for key in ("cells_50", "cells_90"):
                np.testing.assert_allclose(
                    result.per_query[key][index], per_query[key], rtol=1e-6, equal_nan=True
                )
            if scope == "query":
                for key in ("mask_recall", "mask_tnr"):
                    np.testing.assert_allclose(result.per_query[key][index], per_query[key], rtol=1e-6)
            checked += 1
    return checked


# ---- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("per_head", "precision", "strides"),
    [
        (False, "uint8", (1, 1)),
        (True, "uint8", (2, 3)),
        (True, "float16", (3, 2)),
        (False, "float16", (2, 2)),
    ],
)
def test_every_column_equals_brute_force(tmp_path: Path, per_head: bool, precision: str, strides) -> None:
    root = write_synthetic_export(
        tmp_path / "export", num_frames=3, H_p=7, W_p=8, stride_h=strides[0], stride_w=strides[1],
        num_layers=2, num_heads=3, per_head=per_head, precision=precision,
        kinds=("global", "frame", "dino"), rollout=True,
    )  # fmt: skip
    export = open_export(root)
    correspondence = _positions(export)
    result = run_analysis(export, correspondence=correspondence, masses=MASSES)
    checked = _check_every_row(export, result, correspondence)
    assert checked == len(export.layer_names) + (3 * 6 if per_head else 0)
    kinds = {export.layer_meta(n)["layer_kind"] for n in export.layer_names}
    assert kinds == {"global", "frame", "dino", "rollout"}
    # Frame and DINOv2 layers see frame 0 only: no cross-view columns.
    for record in result.records:
        if record["layer"].startswith(("frame_", "dino_")):
            assert math.isnan(record["cross_view_mass"]) and math.isnan(record["pck_1"])
            assert math.isnan(record["corr_mass"]) and record["corr_source"] == ""
        elif record["layer"].startswith(("global_", "rollout")):
            assert record["corr_source"] == "truth" and 0 <= record["pck_2"] <= 1


def test_stride_one_global_only_and_radius(tmp_path: Path) -> None:
    root = write_synthetic_export(
        tmp_path / "export", num_frames=4, H_p=5, W_p=6, num_layers=3, per_head=True
    )
    export = open_export(root)
    correspondence = _positions(export, seed=3)
    result = run_analysis(export, correspondence=correspondence, masses=MASSES, radius=2, reference_layer=0)
    assert result.summary["options"]["reference_layer"] == "layer_01"
    _check_every_row(export, result, correspondence, radius=2)


def test_many_masses(tmp_path: Path) -> None:
    """More masks than one 64-bit word of running counts holds (the uint8 path packs several per word)."""
    root = write_synthetic_export(
        tmp_path / "export", num_frames=3, H_p=7, W_p=8, num_layers=2, per_head=True
    )
    export = open_export(root)
    masses = tuple(np.round(np.arange(0.05, 1.0, 0.08), 2))
    result = run_analysis(export, masses=masses)
    assert _check_every_row(export, result, None, masses=masses) == 2 * 5


@pytest.mark.parametrize("precision", ["uint8", "float16"])
def test_stability_scope_all_is_the_forks_definition(tmp_path: Path, precision: str) -> None:
    root = write_synthetic_export(
        tmp_path / "export", num_frames=3, H_p=6, W_p=7, num_layers=4, precision=precision, stride_h=2
    )
    export = open_export(root)
    result = run_analysis(export, reference_layer=1, masses=MASSES, stability_scope="all")
    _check_every_row(export, result, None, scope="all")
    # The fork's own reading: the stored arrays as float32 (codes for uint8), reference = its --start_layer.
    arrays = {
        export.layer_meta(n)["block_index"]: np.asarray(export.heatmaps(n)).astype(np.float32)
        for n in export.layer_names
    }
    index = {r["layer"]: i for i, r in enumerate(result.records) if r["head"] == "avg"}
    for j, name in enumerate(export.layer_names):
        for m, mass in enumerate(MASSES):
            recall, tnr = _fork_recall_tnr(_fork_mask(arrays[1], mass), _fork_mask(arrays[j], mass))
            assert result.per_query["mask_recall_overall"][index[name], m] == pytest.approx(recall, abs=1e-7)
            assert result.per_query["mask_tnr_overall"][index[name], m] == pytest.approx(tnr, abs=1e-7)


def _write_layers(
    root: Path,
    maps_fn,
    H_p=6,
    W_p=7,
    stride=2,
    S=3,
    heads=2,
    n_special=5,
    layers=2,
    sources=None,
    mode="crop",
):
    """An export whose float16 maps come from ``maps_fn(layer) -> (pooled [Q, heads, S, H_ds, W_ds],
    special [Q, heads, S, n_special])`` probabilities."""
    writer = ExportWriter(root)
    writer.write_frames(synthetic_frames(S, H_p * 14, W_p * 14), sources or [f"v{i}.png" for i in range(S)])
    for layer in range(layers):
        pooled, special = maps_fn(layer)
        heatmaps, fields = encode_layer(pooled.astype(np.float32), "float16")
        meta = {"layer_index": layer + 1, "block_index": layer, "H_p": H_p, "W_p": W_p, "stride_h": stride,
                "stride_w": stride, "num_heads": heads} | fields  # fmt: skip
        meta["special_tokens"] = special_token_names(n_special)
        writer.write_layer(f"layer_{layer + 1:02d}", heatmaps, special.astype(np.float16), meta)
    writer.write_manifest({"image_set_name": "t", "model": {}, "preprocess_mode": mode, "first_image_idx": 0})
    return open_export(root)


def test_oracle_export_finds_every_true_cell(tmp_path: Path) -> None:
    H_p, W_p, stride, S, heads = 6, 7, 2, 3, 2
    H_ds, W_ds = query_grid_shape(H_p, W_p, stride, stride)
    Q = H_ds * W_ds
    rng = np.random.default_rng(1)
    target_rows = rng.integers(0, H_ds, size=(S, Q))
    target_cols = rng.integers(0, W_ds, size=(S, Q))
    centres = np.stack([(target_cols * stride * 14 + 6.5), (target_rows * stride * 14 + 6.5)], axis=-1)

    def oracle(layer):
        pooled = np.zeros((Q, heads, S, H_ds, W_ds))
        for f in range(S):
            pooled[np.arange(Q), :, f, target_rows[f], target_cols[f]] = 0.25
        return pooled, np.full((Q, heads, S, 5), 0.25 / 5)

    export = _write_layers(tmp_path / "oracle", oracle)
    correspondence = Correspondence("truth", centres.astype(np.float32), np.ones((S, Q), dtype=bool))
    for record in analyze(export, correspondence=correspondence, radius=0):
        if record["layer"].startswith("layer_"):
            assert record["pck_0"] == 1.0 and record["corr_mass"] == 1.0
            assert record["cross_view_mass"] == pytest.approx(0.5, rel=1e-3)


def _oracle_maps(target_rows, target_cols, shape, heads=2):
    """Every query's mass on its true cell in every frame where the cell is known (on the frame's special
    tokens where it is not), so that every row sums to 1."""
    S, Q = target_rows.shape
    H_ds, W_ds = shape

    def maps(layer):
        pooled = np.zeros((Q, heads, S, H_ds, W_ds))
        special = np.full((Q, heads, S, 5), 0.2 / S / 5)
        for f in range(S):
            known = target_rows[f] >= 0
            pooled[np.flatnonzero(known), :, f, target_rows[f, known], target_cols[f, known]] = 0.8 / S
            special[~known, :, f] += 0.8 / S / 5
        return pooled, special

    return maps


def test_scene_positions_through_the_preprocessing(tmp_path: Path) -> None:
    from vggt.attn_format.grid import cell_of_pixel
    from vggt.geometry.correspondence import true_correspondences

    scene = Path(__file__).resolve().parents[1] / "examples" / "synthetic_room"
    sources = ["view_02.png", "view_00.png", "view_05.png"]
    grid = {"H_p": 37, "W_p": 37, "stride_h": 2, "stride_w": 2, "patch_size": 14}
    xy, visible = true_correspondences(scene, sources, "pad", (518, 518), grid)
    rows, cols = cell_of_pixel(xy, 37, 37, 2, 2)
    maps = _oracle_maps(rows, cols, query_grid_shape(37, 37, 2, 2))
    export = _write_layers(tmp_path / "scene", maps, H_p=37, W_p=37, sources=sources, mode="pad")
    result = run_analysis(export, scene=scene)
    assert result.summary["correspondence"] == {"source": "scene", "pairs": int(visible[1:].sum())}
    np.testing.assert_array_equal(result.per_query["target_rows"], rows)
    np.testing.assert_array_equal(result.per_query["target_valid"][1:], visible[1:])
    for record in result.records:
        if record["layer"].startswith("layer_"):
            assert record["corr_source"] == "scene" and record["pck_0"] == 1.0 and record["corr_mass"] == 1.0
    # A scene the frames do not belong to, or a folder that is no scene.
    with pytest.raises(AnalysisError, match="not one of its views"):
        run_analysis(_write_layers(tmp_path / "other", maps, H_p=37, W_p=37), scene=scene)
    with pytest.raises(AnalysisError, match="not a scene folder"):
        run_analysis(export, scene=tmp_path)


def test_uniform_export_gives_the_uniform_baseline(tmp_path: Path) -> None:
    H_p, W_p, stride, S, heads, n_special = 6, 7, 2, 3, 2, 5
    H_ds, W_ds = query_grid_shape(H_p, W_p, stride, stride)
    Q = H_ds * W_ds
    tokens = S * (H_p * W_p + n_special)
    patches = np.minimum(stride, H_p - np.arange(H_ds) * stride)[:, None] * np.minimum(
        stride, W_p - np.arange(W_ds) * stride
    )

    def uniform(layer):
        pooled = np.broadcast_to(patches / tokens, (Q, heads, S, H_ds, W_ds))
        return pooled, np.full((Q, heads, S, n_special), 1 / tokens)

    export = _write_layers(tmp_path / "uniform", uniform)
    correspondence = _positions(export, seed=5)
    records = analyze(export, correspondence=correspondence, dataframe=True)
    baseline = records[records.layer == "uniform"].iloc[0]
    for _, row in records[records.layer.str.startswith("layer_")].iterrows():
        for column in ("cross_view_mass", "query_frame_mass", "camera_mass", "register_mass", "entropy"):
            assert row[column] == pytest.approx(baseline[column], rel=2e-3), column
        for column in ("cells_50", "cells_90", "pck_0", "pck_1", "pck_2", "corr_mass"):
            assert row[column] == pytest.approx(baseline[column], rel=1e-9, abs=1e-3 / Q), column


def test_same_uv_baseline(tmp_path: Path) -> None:
    root = write_synthetic_export(tmp_path / "export", H_p=6, W_p=7, stride_h=2, stride_w=2)
    export = open_export(root)
    meta = export.layer_meta(export.layer_names[0])
    points = cell_centres(6, 7, 2, 2)
    Q = points.shape[0]
    # Frame 1: every point one cell to the right (off the grid for the last column); frame 2: unmoved.
    xy = np.stack([points, points + [28.0, 0.0], points]).astype(np.float32)
    visible = np.ones((3, Q), dtype=bool)
    record = next(
        r
        for r in analyze(export, correspondence=Correspondence("track", xy, visible))
        if r["layer"] == "same_uv"
    )
    last_column = (np.arange(Q) % meta["W_ds"]) == meta["W_ds"] - 1
    assert record["pck_0"] == pytest.approx((Q + last_column.sum()) / (2 * Q))
    assert record["pck_1"] == 1.0 and record["corr_source"] == "track"


def test_reference_layer_choice_and_bad_options(tmp_path: Path) -> None:
    root = write_synthetic_export(tmp_path / "export", num_layers=5, kinds=("global", "frame"), rollout=True)
    export = open_export(root)
    assert resolve_reference(export, None) == "global_03"  # the middle global layer (0-based 2)
    assert resolve_reference(export, 0) == "global_01"
    assert resolve_reference(export, "4") == "global_05"
    assert resolve_reference(export, "frame_02") == "frame_02"
    with pytest.raises(AnalysisError, match="no global layer 5"):
        resolve_reference(export, 5)
    with pytest.raises(AnalysisError, match="no layer 'layer_99'"):
        resolve_reference(export, "layer_99")
    for masses in ([0.0, 0.5], [1.0], [], [0.5, 0.5], [-0.2]):
        with pytest.raises(AnalysisError, match="mass"):
            run_analysis(export, masses=masses)
    with pytest.raises(AnalysisError, match="radius"):
        run_analysis(export, radius=-1)
    with pytest.raises(AnalysisError, match="scope"):
        run_analysis(export, stability_scope="some")
    wrong = Correspondence("truth", np.zeros((2, 3, 2), np.float32), np.ones((2, 3), bool))
    with pytest.raises(AnalysisError, match="do not fit"):
        run_analysis(export, correspondence=wrong)


def test_without_positions_the_correspondence_columns_are_empty(tmp_path: Path) -> None:
    root = write_synthetic_export(tmp_path / "export", per_head=True, num_layers=2)
    records = analyze(root)
    for record in records:
        assert math.isnan(record["pck_0"]) and math.isnan(record["corr_mass"]) and record["corr_source"] == ""
    assert [r["head"] for r in records[:5]] == ["avg", "1", "2", "3", "4"]
    assert list(records[0]) == list(COLUMNS)


def test_worker_processes_give_the_same_analysis(tmp_path: Path) -> None:
    root = write_synthetic_export(tmp_path / "export", num_layers=3, per_head=True, kinds=("global", "frame"))
    export = open_export(root)
    correspondence = _positions(export, seed=2)
    alone = run_analysis(export, correspondence=correspondence)
    seen = []
    shared = run_analysis(root, correspondence=correspondence, workers=2, progress=lambda *a: seen.append(a))
    assert len(seen) == len(export.layer_names) and seen[-1][:2] == (6, 6)
    assert [r["layer"] for r in shared.records] == [r["layer"] for r in alone.records]
    for key, values in alone.per_query.items():
        np.testing.assert_array_equal(shared.per_query[key], values, err_msg=key)
    with pytest.raises(AnalysisError, match="workers"):
        run_analysis(export, workers=0)


@pytest.mark.parametrize("precision", ["uint8", "float16"])
def test_blocks_of_a_few_queries_give_the_same_analysis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """A layer is read a block of queries at a time: blocks of 3 queries (the last one shorter) give the
    analysis of one block."""
    import vggt.analysis.table as table

    root = write_synthetic_export(
        tmp_path / "export", num_frames=3, H_p=5, W_p=7, num_layers=2, num_heads=3, per_head=True,
        precision=precision, kinds=("global", "frame"),
    )  # fmt: skip
    export = open_export(root)
    correspondence = _positions(export, seed=4)
    whole = run_analysis(export, correspondence=correspondence, masses=MASSES)
    meta = export.layer_meta(export.layer_names[0])
    cells = meta["H_ds"] * meta["W_ds"] * np.dtype(meta["dtype"]).itemsize
    monkeypatch.setattr(table, "_BLOCK_BYTES", 3 * 3 * 3 * cells)  # 3 queries of 3 heads over 3 frames
    assert [b.stop - b.start for b in table._query_blocks(35, 3 * 3 * cells)][-2:] == [3, 2]
    blocks = run_analysis(export, correspondence=correspondence, masses=MASSES)
    _check_every_row(export, blocks, correspondence)
    for key, values in whole.per_query.items():
        np.testing.assert_array_equal(blocks.per_query[key], values, err_msg=key)


def test_the_exports_own_geometry_gives_the_positions(tmp_path: Path) -> None:
    from vggt.attn_format.grid import cell_of_pixel

    root = write_synthetic_export(tmp_path / "export", H_p=6, W_p=8, num_layers=2, geometry=True)
    export = open_export(root)
    geometry = export.geometry()
    assert geometry.sources == ("truth", "track", "depth")
    result = run_analysis(export)
    xy, visible = geometry.correspondence("truth")
    rows, cols = cell_of_pixel(xy, 6, 8, 1, 1)
    assert result.summary["correspondence"] == {"source": "truth", "pairs": int(visible[1:].sum())}
    np.testing.assert_array_equal(result.per_query["target_rows"], rows)
    np.testing.assert_array_equal(result.per_query["target_cols"], cols)
    _check_every_row(export, result, Correspondence("truth", xy, visible))
    # The first layer's blobs sit one patch to the right per frame, where the truth moves the points.
    first = next(r for r in result.records if r["layer"] == "layer_01")
    assert first["corr_source"] == "truth" and first["pck_1"] == 1.0
    # An explicit correspondence (the track head's) takes precedence.
    xy, visible = geometry.correspondence("track")
    tracked = run_analysis(export, correspondence=Correspondence("track", xy, visible))
    assert tracked.summary["correspondence"]["source"] == "track"


@pytest.mark.parametrize("form", ["layer", "head", "raw"])
def test_seed_exports_have_no_special_token_columns(tmp_path: Path, form: str) -> None:
    from tests.test_format import _write_seed_export

    export_dir, _, _ = _write_seed_export(tmp_path, form)
    export = open_export(export_dir / "attn_maps")
    correspondence = _positions(export, seed=4)
    result = run_analysis(export, correspondence=correspondence)
    _check_every_row(export, result, correspondence)
    for record in result.records:
        if record["layer"] != "same_uv":
            assert math.isnan(record["camera_mass"]) and math.isnan(record["register_mass"])
            assert 0 < record["entropy"] <= 1
