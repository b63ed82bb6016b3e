"""intervene_attention.py end to end on the tiny VGGT with heads, and its one-line errors."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file, save_file

from vggt.intervene_cli import main
from vggt.intervention_results import COLUMNS, ResultsError, read_results
from vggt.models.config import VGGTConfig

from .conftest import EXAMPLE_IMAGES, FIXTURES

HEADS_REFERENCE = FIXTURES / "tiny_vggt_heads_reference"


@pytest.fixture(scope="module")
def tiny_heads_files(tmp_path_factory):
    """The tiny VGGT with heads as a checkpoint and its architecture as JSON."""
    folder = tmp_path_factory.mktemp("tiny_heads")
    reference = load_file(HEADS_REFERENCE.with_suffix(".safetensors"))
    weights = {
        k.removeprefix("model."): v.contiguous() for k, v in reference.items() if k.startswith("model.")
    }
    save_file(weights, folder / "tiny.safetensors")
    config = VGGTConfig.from_reference_json(json.loads(HEADS_REFERENCE.with_suffix(".json").read_text()))
    (folder / "tiny.json").write_text(json.dumps(config.to_dict()))
    return folder


def intervene(files, out, *args: str) -> int:
    return main([
        "--checkpoint", str(files / "tiny.safetensors"), "--model_config", str(files / "tiny.json"),
        "--image_dir", str(EXAMPLE_IMAGES), "--num_images", "2", "--output_dir", str(out), "--quiet", *args,
    ])  # fmt: skip


def test_a_sweep_of_every_kind_writes_results_figures_and_settings(tiny_heads_files, tmp_path):
    out = tmp_path / "sweep"
    code = intervene(
        tiny_heads_files, out, "--stride", "8",
        "--ablate_heads", "global:4:2", "--global_to_frame", "1",
        "--mask_keys", "--reference_layer", "2", "--masses", "0.5",
        "--block_sparse", "0.6",
    )  # fmt: skip
    assert code == 0
    rows = read_results(out)
    kinds = [row.kind for row in rows]  # the unmodified run, then the sweep in the order asked for
    assert kinds == ["none", "ablate_heads", "mask_keys", "global_to_frame", "block_sparse"]
    unmodified, ablated, masked, to_frame, sparse = rows
    assert (
        ablated.layers == "global:4" and ablated.head == 2 and ablated["kept_pairs"] == pytest.approx(3 / 4)
    )
    assert to_frame.layers == "global:1" and to_frame["kept_pairs"] == pytest.approx(1 / 2)  # 2 frames
    assert masked.layers == "global:3-4" and masked["value"] == 0.5 and 0 < masked["kept_pairs"] < 1
    assert sparse.layers == "global:1-4" and sparse["value"] == 0.6 and 0 < sparse["kept_pairs"] <= 1
    errors = [c for c in COLUMNS if c.endswith(("_deg", "_rel", "_mae", "_mean", "_px"))]
    assert all(unmodified[c] == 0.0 for c in errors if not c.startswith("truth_"))
    # The bundled scene has true geometry: every truth column is measured, also for the unmodified run.
    for row in rows:
        assert all(math.isfinite(row[c]) and row[c] >= 0 for c in errors), row.intervention
    for row in (to_frame, ablated):
        assert row["depth_abs_rel"] > 0 and row["points_mean"] > 0
    for name in ("ablation_heatmap", "mask_keys_curve", "block_sparse_curve"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.svg").stat().st_size > 1000
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["frame_sources"] == ["view_00.png", "view_07.png"] and sweep["scene"] == "synthetic_room"
    assert sweep["settings"]["reference_layer"] == "global:2" and sweep["query_grid"]["stride_h"] == 8
    assert not list(tmp_path.glob(".*"))  # no staging folder left


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "nothing to run: give --ablate_heads, --mask_keys, --global_to_frame or --block_sparse"),
        (("--ablate_heads", "global:5"), "--ablate_heads: global layer 5 does not exist: the model has"),
        (
            ("--ablate_heads", "frame:1:5"),
            "--ablate_heads: head 5 does not exist: frame layer 1 has heads 1-4",
        ),
        (("--ablate_heads", "cross:1"), "--ablate_heads: unknown layer kind 'cross'"),
        (
            ("--mask_keys", "--reference_layer", "2", "--masses", "0.5,1.5"),
            "--masses value must be in (0, 1], got 1.5",
        ),
        (
            ("--mask_keys", "--reference_layer", "2", "--masses", "0"),
            "--masses value must be in (0, 1], got 0.0",
        ),
        (
            ("--mask_keys", "--reference_layer", "global:7"),
            "--reference_layer: global layer 7 does not exist",
        ),
        (("--mask_keys", "--reference_layer", "4"), "no global layer after global layer 4 to mask"),
        (("--global_to_frame", "frame:1"), "--global_to_frame: only global layers"),
        (("--global_to_frame", "3-1"), "--global_to_frame: layers range 3-1 runs backwards"),
        (("--block_sparse", "0.5,x"), "--block_sparse: 'x' is not a number"),
        (("--block_sparse", "0.5", "--block_layers", "global:0"), "global layer 0 does not exist"),
        (("--ablate_heads", "1", "--stride", "0"), "--stride must be at least 1"),
        (("--ablate_heads", "1", "--scene", "/nonexistent"), "--scene /nonexistent is not a scene folder"),
    ],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(tiny_heads_files, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert intervene(tiny_heads_files, out, *args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert message in error, error
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_results_reader_refuses_what_is_not_a_results_file(tmp_path):
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ResultsError, match="not an intervention results file"):
        read_results(tmp_path)
    header = ",".join(COLUMNS)
    (tmp_path / "results.csv").write_text(
        header + "\nx,ablate_heads,global:1,1," + "abc," * (len(COLUMNS) - 5) + "\n"
    )
    with pytest.raises(ResultsError, match="line 2: a number column holds something else"):
        read_results(tmp_path)
    (tmp_path / "results.csv").write_text(header + "\nx,rm -rf,global:1,1" + "," * (len(COLUMNS) - 4) + "\n")
    with pytest.raises(ResultsError, match="line 2: unknown kind"):
        read_results(tmp_path)
    with pytest.raises(ResultsError, match="cannot read"):
        read_results(tmp_path / "missing")


def test_the_readmes_small_config_builds_a_vggt_with_its_heads():
    import torch

    from vggt.models.vggt import VGGT

    config = VGGTConfig.from_dict(
        json.loads((EXAMPLE_IMAGES.parents[1] / "vggt_small_config.json").read_text())
    )
    with torch.device("meta"):
        model = VGGT.from_config(config, heads=True)
    assert len(model.aggregator.global_blocks) == 12 and model.aggregator.global_blocks[5].attn.num_heads == 6
    assert config.depth_head.intermediate_layer_idx == (2, 5, 8, 11)
    assert sum(p.numel() for p in model.parameters()) < 100e6
