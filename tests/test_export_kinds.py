"""Issue 5 on the tiny reference model: rollout, camera-token maps, frame and DINOv2 layers, names, CLI.

Every expected value is computed here, in float64 numpy, from the fixture's full attention matrices
(upstream's own probabilities), never from this package's capture code.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.reference import PATCH, SPECIAL, pool, query_rows
from vggt.attn_format import open_export
from vggt.export import ExportError
from vggt.export_cli import main
from vggt.rollout import rollout_storage

EXAMPLE_IMAGES = Path(__file__).parents[1] / "examples" / "synthetic_room" / "images"


def geometry(reference):
    _, frames, _, height, width = reference["input.images"].shape
    grid_h, grid_w = height // PATCH, width // PATCH
    return frames, grid_h, grid_w, SPECIAL + grid_h * grid_w


def full_matrices(reference):
    """Every frame and global layer as a head-averaged ``[N, N]`` matrix, in model order."""
    frames, _, _, per_frame = geometry(reference)
    depth = sum(key.startswith("expected.attn.global.") for key in reference)
    matrices = []
    for index in range(depth):
        blocks = reference[f"expected.attn.frame.{index}"].double().numpy().mean(axis=1)  # [S, T, T]
        frame_matrix = np.zeros((frames * per_frame, frames * per_frame))
        for f in range(frames):
            frame_matrix[f * per_frame : (f + 1) * per_frame, f * per_frame : (f + 1) * per_frame] = blocks[f]
        matrices.append(frame_matrix)
        matrices.append(reference[f"expected.attn.global.{index}"][0].double().numpy().mean(axis=0))
    return matrices


def reference_rollout(reference, discard: float) -> np.ndarray:
    """The schema's formula: (A + I) row-normalized, smallest floor(r * N) of each row zeroed, rows
    normalized again, multiplied."""
    matrices = full_matrices(reference)
    tokens = matrices[0].shape[0]
    flow = np.eye(tokens)
    for attention in matrices:
        step = attention + np.eye(tokens)
        step /= step.sum(axis=-1, keepdims=True)
        count = math.floor(discard * tokens)
        if count:
            smallest = np.argsort(step, axis=-1, kind="stable")[:, :count]
            np.put_along_axis(step, smallest, 0.0, axis=-1)
            step /= step.sum(axis=-1, keepdims=True)
        flow = step @ flow
    return flow


def all_rows(export, name: str) -> np.ndarray:
    return np.stack([export.query_maps(name, qi) for qi in range(export.layer_meta(name)["Q"])])


def all_token_rows(export, name: str) -> np.ndarray:
    return np.stack(
        [export.token_maps(name, t) for t in range(len(export.layer_meta(name)["token_queries"]))]
    )


@pytest.mark.parametrize("discard", [0.0, 0.5, 0.9])
@pytest.mark.parametrize(("stride_h", "stride_w"), [(1, 1), (3, 2)])
def test_rollout_equals_the_formula_on_upstream_attention(
    export_tiny, tiny_reference, tmp_path, discard, stride_h, stride_w
):
    out = export_tiny(tmp_path / "e", rollout=True, rollout_discard=discard,
              precision="float16", stride_h=stride_h, stride_w=stride_w)  # fmt: skip
    export = open_export(out)
    export.validate()
    assert export.layer_names[-1] == "rollout"
    meta = export.layer_meta("rollout")
    assert meta["layer_kind"] == "rollout" and meta["rollout_discard_ratio"] == discard
    assert meta["rollout_layers"] == 4 and meta["per_head_data"] is False
    frames, grid_h, grid_w, per_frame = geometry(tiny_reference)
    flow = reference_rollout(tiny_reference, discard)
    rows = query_rows(grid_h, grid_w, stride_h, stride_w)
    want, want_special = pool(flow[rows], frames, grid_h, grid_w, stride_h, stride_w)
    cameras = [f * per_frame for f in range(frames)]
    want_tokens, want_token_special = pool(flow[cameras], frames, grid_h, grid_w, stride_h, stride_w)
    # float16 storage: ~1e-3 relative; the product itself agrees with upstream's matrices to float32 error.
    np.testing.assert_allclose(all_rows(export, "rollout"), want, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(
        export.special_mass("rollout").astype(np.float64), want_special, rtol=2e-3, atol=1e-5
    )
    np.testing.assert_allclose(all_token_rows(export, "rollout"), want_tokens, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(
        export.token_special_mass("rollout").astype(np.float64), want_token_special, rtol=2e-3, atol=1e-5
    )
    assert meta["token_queries"] == [{"token": "camera", "frame": f} for f in range(frames)]
    # A product of row-stochastic matrices: every row still sums to 1, also after discarding.
    total = want.sum(axis=(-3, -2, -1)) + want_special.sum(axis=(-2, -1))
    np.testing.assert_allclose(total, 1.0, atol=1e-9)
    stored = all_rows(export, "rollout").sum(axis=(-3, -2, -1))
    np.testing.assert_allclose(stored + export.special_mass("rollout").astype(np.float64).sum(axis=(-2, -1)),
                               1.0, atol=5e-3)  # fmt: skip


def expected_layer(reference, kind: str, index: int, stride_h: int, stride_w: int, per_head: bool):
    """Upstream's rows for one layer: patch queries and special-token queries, pooled as specified.

    Returns ``(maps, special, token_maps, token_special)``, heads axis second when ``per_head``.
    """
    frames, grid_h, grid_w, per_frame = geometry(reference)
    probs = reference[f"expected.attn.{kind}.{index}"].double().numpy()
    if kind == "global":  # one sequence of all frames; every frame's camera token is a query
        sequence, key_frames, tokens = probs[0], frames, [f * per_frame for f in range(frames)]
    else:  # one frame per batch entry; frame 0's camera (frame) or class token (dino) is the query
        sequence, key_frames, tokens = probs[0], 1, [0]
    rows = query_rows(grid_h, grid_w, stride_h, stride_w)
    maps, special = pool(sequence[:, rows], key_frames, grid_h, grid_w, stride_h, stride_w)
    token_maps, token_special = pool(sequence[:, tokens], key_frames, grid_h, grid_w, stride_h, stride_w)
    results = [array.swapaxes(0, 1) for array in (maps, special, token_maps, token_special)]  # rows first
    return results if per_head else [array.mean(axis=1) for array in results]


@pytest.mark.parametrize("per_head", [False, True])
def test_token_frame_and_dino_maps_equal_upstream_rows(export_tiny, tiny_reference, tmp_path, per_head):
    stride_h, stride_w = 2, 3
    out = export_tiny(tmp_path / "e", blocks=("global", "frame", "dino"),
              per_head=per_head, precision="float16", stride_h=stride_h, stride_w=stride_w)  # fmt: skip
    export = open_export(out)
    export.validate()
    kinds = ("global", "frame", "dino")
    assert export.layer_names == [f"{kind}_{n:02d}" for kind in kinds for n in (1, 2)]
    manifest = export.manifest
    assert [entry["kind"] for entry in manifest["layers"]] == ["global"] * 2 + ["frame"] * 2 + ["dino"] * 2
    assert manifest["blocks"] == ["global", "frame", "dino"] and manifest["rollout"] is None
    for kind in kinds:
        for index in range(2):
            name = f"{kind}_{index + 1:02d}"
            meta = export.layer_meta(name)
            want, want_special, want_tokens, want_token_special = expected_layer(
                tiny_reference, kind, index, stride_h, stride_w, per_head
            )
            assert meta["layer_kind"] == kind and meta["layer_index"] == index + 1
            assert meta["block_index"] == index
            assert meta["key_frames"] == ([0, 1, 2] if kind == "global" else [0])
            first = "cls" if kind == "dino" else "camera"
            assert meta["special_tokens"] == [first, "register_1", "register_2", "register_3", "register_4"]
            frames = [0, 1, 2] if kind == "global" else [0]
            assert meta["token_queries"] == [{"token": first, "frame": f} for f in frames]
            np.testing.assert_allclose(all_rows(export, name), want, rtol=2e-3, atol=1e-5)
            np.testing.assert_allclose(export.special_mass(name).astype(np.float64), want_special, rtol=2e-3,
                                       atol=1e-5)  # fmt: skip
            np.testing.assert_allclose(all_token_rows(export, name), want_tokens, rtol=2e-3, atol=1e-5)
            np.testing.assert_allclose(export.token_special_mass(name).astype(np.float64), want_token_special,
                                       rtol=2e-3, atol=1e-5)  # fmt: skip


def test_uint8_token_maps_use_their_own_scales(export_tiny, tiny_reference, tmp_path):
    export = open_export(export_tiny(tmp_path / "e", per_head=True))
    for index, name in enumerate(export.layer_names):
        meta = export.layer_meta(name)
        _, _, want_tokens, _ = expected_layer(tiny_reference, "global", index, 1, 1, True)
        scales = np.asarray(meta["token_per_head_vmax99"])
        for head in range(4):
            assert scales[head] == pytest.approx(np.percentile(want_tokens[:, head], 99), rel=1e-5)
        got = all_token_rows(export, name)
        clipped = np.minimum(want_tokens, scales[None, :, None, None, None])
        assert np.all(np.abs(got - clipped) <= scales[None, :, None, None, None] / 255 * 0.5 + 1e-6)


def test_rollout_in_a_per_head_export_is_head_averaged(export_tiny, tmp_path):
    export = open_export(export_tiny(tmp_path / "e", per_head=True, rollout=True))
    assert export.layer_names == ["layer_01", "layer_02", "rollout"]
    assert export.layer_meta("layer_02")["per_head_data"] is True
    rollout = export.layer_meta("rollout")
    assert rollout["per_head_data"] is False and rollout["normalized_by"] == "layer"
    assert rollout["layer_index"] is None and rollout["block_index"] is None
    assert export.manifest["rollout"] == {"discard_ratio": 0.9}
    assert export.manifest["layers"][-1] == {
        "name": "rollout", "kind": "rollout", "index": None, "block_index": None,
        "metadata_path": "rollout_metadata.json",
    }  # fmt: skip


def test_layer_selection_applies_to_every_kind(export_tiny, tmp_path):
    export = open_export(export_tiny(tmp_path / "e", blocks=("dino", "global"), layers=(2,)))
    assert export.layer_names == ["global_02", "dino_02"]  # listed by kind, whatever the order asked
    # A Python caller reads of its arguments, the command line of its flags (test_export.py).
    with pytest.raises(ExportError, match=r"^bad blocks=\('global', 'cross'\): use one or more of global"):
        export_tiny(tmp_path / "f", blocks=("global", "cross"))
    with pytest.raises(ExportError, match="discard ratio"):
        export_tiny(tmp_path / "g", rollout=True, rollout_discard=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def run_cli(tiny_cli, tmp_path: Path, *args: str) -> tuple[int, Path]:
    out = tmp_path / "out"
    return tiny_cli("--num_images", "3", "--output_dir", str(out), *args), out


def test_cli_blocks_and_rollout(tiny_cli, tmp_path, capsys):
    code, out = run_cli(tiny_cli, tmp_path, "--blocks", "global,frame,dino", "--rollout",
                         "--rollout-discard", "0.5", "--layers", "2")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    export = open_export(out)
    assert export.layer_names == ["global_02", "frame_02", "dino_02", "rollout"]
    assert export.layer_meta("rollout")["rollout_discard_ratio"] == 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--blocks", "global,cross"], "--blocks"),
        (["--blocks", ""], "--blocks"),
        (["--rollout", "--rollout_discard", "1"], "discard ratio"),
        (["--rollout", "--rollout_discard", "-0.1"], "discard ratio"),
        (["--blocks", "frame", "--layers", "3"], "layer 3"),
    ],
)
def test_cli_bad_kinds_and_discard_exit_2(tiny_cli, tmp_path, capsys, args, message):
    code, out = run_cli(tiny_cli, tmp_path, *args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_cli_refuses_a_rollout_larger_than_free_memory(tiny_cli, tmp_path, capsys, monkeypatch):
    from vggt import export_cli

    monkeypatch.setattr(export_cli, "available_memory_bytes", lambda: 1000)
    code, out = run_cli(tiny_cli, tmp_path, "--rollout")
    err = capsys.readouterr().err
    assert code == 2 and "not enough memory for --rollout" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    code, out = run_cli(tiny_cli, tmp_path)  # without --rollout it goes ahead
    assert code == 0 and out.exists()


def test_cli_plan_shows_the_kinds_and_the_rollout_memory(tiny_cli, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--checkpoint", str(tiny_cli.checkpoint), "--model_config", str(tiny_cli.config), "--image_dir",
            str(tiny_cli.images), "--num_images", "2", "--output_dir", str(out), "--blocks", "frame,global",
            "--rollout"]  # fmt: skip
    assert main(args) == 0
    plan = capsys.readouterr().out
    assert "layers: 4 (global_01 .. frame_02)" in plan
    tokens = 2 * (5 + 28 * 37)  # 2 frames of 392x518 pixels
    matrices = 2 * (tokens**2 + 2 * (tokens // 2) ** 2) * 4  # 2 global [N, N] and 2 frame [S, T, T]
    matrices += 2 * (28 * 37 + 2) * tokens * 4  # the product being formed: [rows, N], twice
    assert "rollout: 4 frame and global layers, discard ratio 0.9, extra memory" in plan
    reported = float(plan.split("extra memory ")[1].split(" MB")[0])
    assert reported == pytest.approx(matrices / 1e6, rel=0.05)


def test_rollout_matrices_stay_on_a_gpu_with_room(monkeypatch):
    assert rollout_storage(torch.device("cpu"), 1) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 30, 80 << 30))
    assert rollout_storage(torch.device("cuda:1"), 5 << 30) == torch.device("cuda:1")
    assert rollout_storage(torch.device("cuda:1"), (5 << 30) + 1) == torch.device("cpu")
