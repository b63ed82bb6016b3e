"""The full VGGT (camera, depth, point and track heads) and the camera utilities compute what upstream
computes, and full checkpoints load strictly (hub cache, local files), while the aggregator-only path
still reads no head tensor."""

from __future__ import annotations

import json

import pytest
import safetensors
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

from vggt.api import load_model
from vggt.geometry.depth import unproject_depth_map_to_point_map
from vggt.geometry.pose_encoding import extri_intri_to_pose_encoding, pose_encoding_to_extri_intri
from vggt.models.config import AggregatorConfig, VGGTConfig
from vggt.models.vggt import VGGT
from vggt.weights import WeightsError, assign_weights

from .conftest import FIXTURES
from .test_weights import COMMIT, make_hub_cache

HEADS_REFERENCE = FIXTURES / "tiny_vggt_heads_reference"
OUTPUTS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf", "track", "vis", "conf")
HEAD_PARTS = ("camera_head", "depth_head", "point_head", "track_head")


def assert_matches(got, expected, name: str, rtol: float = 1e-4, floor_share: float = 1e-6) -> None:
    """Every element within ``rtol`` of the expected value, relative to that value.

    Elements near zero get an absolute floor of ``floor_share`` (1e-6) times the tensor's largest
    magnitude: float32 sums of terms of that size carry rounding errors of about ``1e-7`` of it, so a
    purely relative test of, say, a coordinate that happens to be 1e-5 would compare rounding noise.
    """
    got, expected = torch.as_tensor(got).double(), torch.as_tensor(expected).double()
    assert got.shape == expected.shape, name
    floor = floor_share * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=rtol, atol=floor, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(f"{HEADS_REFERENCE}.safetensors")


@pytest.fixture(scope="module")
def config() -> VGGTConfig:
    return VGGTConfig.from_reference_json(json.loads(HEADS_REFERENCE.with_suffix(".json").read_text()))


@pytest.fixture(scope="module")
def state_dict(reference) -> dict[str, torch.Tensor]:
    """The tiny model's weights under upstream's VGGT state-dict names: a full checkpoint."""
    return {k.removeprefix("model."): v for k, v in reference.items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def model(config, state_dict) -> VGGT:
    model = VGGT(config=config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


@pytest.fixture(scope="module")
def predictions(model, reference) -> dict:
    with torch.no_grad():
        return model(reference["input.images"], reference["input.query_points"])


def assert_forward_matches(predictions: dict, reference: dict) -> None:
    for name in OUTPUTS:
        assert_matches(predictions[name], reference[f"expected.{name}"], name)
    assert len(predictions["pose_enc_list"]) == 4
    for i, pose_enc in enumerate(predictions["pose_enc_list"]):
        assert_matches(pose_enc, reference[f"expected.pose_enc_list.{i}"], f"pose_enc_list.{i}")


def test_config_from_reference_json(config):
    assert config.embed_dim == 64 and config.aggregator.depth == 4 and config.patch_start_idx == 5
    assert config.camera_head.trunk_depth == 2 and config.camera_head.dim_in == 128
    assert config.depth_head.out_channels == (8, 16, 32, 32) and config.depth_head.activation == "exp"
    assert config.point_head.output_dim == 4 and config.point_head.activation == "inv_log"
    track = config.track_head
    assert (track.features, track.iters, track.corr_levels, track.corr_radius, track.hidden_size) == (
        16,
        2,
        3,
        2,
        32,
    )
    assert track.out_channels == (8, 16, 32, 32) and track.intermediate_layer_idx == (0, 1, 2, 3)
    assert VGGTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_forward_equals_upstream(predictions, reference):
    assert_forward_matches(predictions, reference)
    assert predictions["images"].shape == reference["input.images"].shape
    assert set(predictions) == {*OUTPUTS, "pose_enc_list", "images"}


def test_unbatched_inputs_and_no_query_points(model, reference, predictions):
    with torch.no_grad():
        unbatched = model(reference["input.images"][0], reference["input.query_points"][0])
        without_queries = model(reference["input.images"])
    for name in OUTPUTS:
        torch.testing.assert_close(unbatched[name], predictions[name], rtol=0, atol=0)
    assert "track" not in without_queries and "vis" not in without_queries and "conf" not in without_queries
    torch.testing.assert_close(without_queries["depth"], predictions["depth"], rtol=0, atol=0)
    model.train()
    try:
        with torch.no_grad():
            assert "images" not in model(reference["input.images"])
    finally:
        model.eval()


def test_heads_run_on_tokens_of_a_pass_already_made(model, reference, predictions):
    images = reference["input.images"]
    with torch.no_grad():
        tokens, patch_start_idx = model.aggregator(images)
        again = model.run_heads(tokens, images, patch_start_idx, reference["input.query_points"][0])
        for name in OUTPUTS:
            torch.testing.assert_close(again[name], predictions[name], rtol=0, atol=0)
        with pytest.raises(ValueError, match="keep_outputs=True"):
            model.run_heads(tokens[-1:], images, patch_start_idx)


def test_frame_chunks_give_the_same_maps(model, reference, predictions):
    heads = (model.depth_head, model.point_head, model.track_head.feature_extractor)
    try:
        for head in heads:
            head.frames_chunk_size = 1
        with torch.no_grad():
            chunked = model(reference["input.images"], reference["input.query_points"])
    finally:
        for head in heads:
            head.frames_chunk_size = 8
    for name in OUTPUTS:
        torch.testing.assert_close(chunked[name], predictions[name], rtol=1e-5, atol=1e-6)


def test_heads_run_in_float32_under_cpu_autocast(model, reference):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(reference["input.images"], reference["input.query_points"])
    for name in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        assert out[name].dtype == torch.float32, name
        assert torch.isfinite(out[name]).all(), name
    assert torch.isfinite(out["track"]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_in_float32_and_under_bf16_autocast(config, state_dict, reference, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = VGGT(config=config).eval().cuda()
    model.load_state_dict(state_dict, strict=True)
    images, query_points = reference["input.images"].cuda(), reference["input.query_points"].cuda()
    with torch.no_grad():
        exact = model(images, query_points)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mixed = model(images, query_points)
    for name in OUTPUTS:
        # Other kernels, other summation orders: a GPU gets a looser bound than the CPU.
        assert_matches(exact[name].cpu(), reference[f"expected.{name}"], name, rtol=1e-3, floor_share=1e-4)
    for name in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        assert mixed[name].dtype == torch.float32, name  # these heads run in float32, as upstream's
        assert torch.isfinite(mixed[name]).all(), name
    assert torch.isfinite(mixed["track"]).all()


def test_camera_and_depth_utilities_equal_upstream(reference):
    image_hw = (56, 70)
    extrinsic, intrinsic = pose_encoding_to_extri_intri(reference["expected.pose_enc"], image_hw)
    assert_matches(extrinsic, reference["expected.extrinsic"], "extrinsic")
    assert_matches(intrinsic, reference["expected.intrinsic"], "intrinsic")
    only_extrinsic, none = pose_encoding_to_extri_intri(
        reference["expected.pose_enc"], build_intrinsics=False
    )
    assert none is None and torch.equal(only_extrinsic, extrinsic)

    extrinsic, intrinsic = reference["expected.extrinsic"], reference["expected.intrinsic"]
    pose_enc = extri_intri_to_pose_encoding(extrinsic, intrinsic, image_hw)
    assert_matches(pose_enc, reference["expected.pose_enc_from_cameras"], "pose_enc_from_cameras")
    quaternion = pose_enc[..., 3:7]
    torch.testing.assert_close(quaternion.norm(dim=-1), torch.ones(1, 3))
    assert (quaternion[..., 3] >= 0).all()

    depth = reference["expected.depth"][0]
    for inputs in (
        (depth, extrinsic[0], intrinsic[0]),
        (depth[..., 0].numpy(), extrinsic[0].numpy(), intrinsic[0]),
    ):
        points = unproject_depth_map_to_point_map(*inputs)
        assert_matches(points, reference["expected.world_points_from_depth"], "world_points_from_depth")


def test_pose_encoding_round_trip_on_awkward_rotations():
    # Rotations by pi (w = 0) and near it pick different candidate rows in mat_to_quat.
    quaternions = torch.tensor(
        [
            [1.0, 0, 0, 0],
            [0, 1, 0, 0],
            [0, 0, 1, 0],
            [0, 0, 0, 1],
            [0.3, -0.5, 0.7, 1e-4],
            [0.1, 0.2, -0.3, -0.9],
        ]
    )
    quaternions = quaternions / quaternions.norm(dim=-1, keepdim=True)
    encoding = torch.cat([torch.randn(6, 3), quaternions, torch.full((6, 2), 0.8)], dim=-1)[None]
    extrinsic, intrinsic = pose_encoding_to_extri_intri(encoding, (40, 60))
    back = extri_intri_to_pose_encoding(extrinsic, intrinsic, (40, 60))
    standard = torch.where(quaternions[:, 3:] < 0, -quaternions, quaternions)
    torch.testing.assert_close(back[0, :, 3:7], standard, atol=1e-6, rtol=0)
    torch.testing.assert_close(back[0, :, :3], encoding[0, :, :3])
    torch.testing.assert_close(back[0, :, 7:], encoding[0, :, 7:])


def test_unproject_checks_its_inputs():
    with pytest.raises(ValueError, match=r"extrinsics \[S, 3, 4\]"):
        unproject_depth_map_to_point_map(
            torch.ones(2, 4, 5), torch.zeros(3, 3, 4), torch.eye(3).repeat(2, 1, 1)
        )
    skewed = torch.eye(3).repeat(2, 1, 1)
    skewed[:, 0, 1] = 0.5
    with pytest.raises(ValueError, match="skew"):
        unproject_depth_map_to_point_map(torch.ones(2, 4, 5), torch.zeros(2, 3, 4), skewed)


# --------------------------------------------------------------------------------------------------
# Building


def test_constructor_arguments_and_config_agree():
    with torch.device("meta"):
        small = VGGT(img_size=224, embed_dim=256)
    assert small.config.img_size == 224 and small.config.aggregator.patch_embed.embed_dim == 256
    assert small.camera_head.trunk[0].attn.qkv.in_features == 512
    assert small.depth_head.projects[0].in_channels == 512
    with pytest.raises(ValueError, match="contradict"):
        VGGT(patch_size=16, config=VGGTConfig())


def test_heads_too_deep_for_the_aggregator_are_named():
    shallow = AggregatorConfig.from_dict({"depth": 2, "patch_embed": {"depth": 1}})
    with torch.device("meta"):
        aggregator_only = VGGT.from_config(shallow, heads=False)
        with pytest.raises(ValueError, match=r"depth_head reads aggregator layers \(4, 11, 17, 23\).* has 2"):
            VGGT(config=shallow, enable_camera=False)
    assert aggregator_only.camera_head is None and aggregator_only.track_head is None


# --------------------------------------------------------------------------------------------------
# Loading full checkpoints


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture()
def checkpoint(tmp_path, state_dict):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    return path


@pytest.fixture()
def tensors_read(monkeypatch) -> list[str]:
    """Names of the tensors read from safetensors files from now on."""
    names: list[str] = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self._handle = real_open(*args, **kwargs)

        def __enter__(self):
            self._inner = self._handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_tensor(self, name):
            names.append(name)
            return self._inner.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    return names


def test_from_pretrained_through_a_hub_cache(
    tmp_path, offline, checkpoint, config, reference, state_dict, tensors_read
):
    cache = tmp_path / "hub"
    make_hub_cache(
        cache, {"model.safetensors": checkpoint.read_bytes(), "config.json": b"{}"}, "someone/tiny-vggt"
    )

    for revision in (None, "main", COMMIT):
        tensors_read.clear()
        model = VGGT.from_pretrained("someone/tiny-vggt", revision=revision, cache_dir=cache, config=config)
        assert sorted(tensors_read) == sorted(state_dict)
    assert not model.training and model.weights_source["revision"] == COMMIT
    assert model.weights_source["id"] == "someone/tiny-vggt"
    with torch.no_grad():
        assert_forward_matches(model(reference["input.images"], reference["input.query_points"]), reference)

    with pytest.raises(WeightsError, match="local_files_only|offline mode"):
        VGGT.from_pretrained("someone/other", cache_dir=cache, config=config, local_files_only=True)


def test_from_pretrained_local_file_and_folder(checkpoint, config, reference):
    for source in (checkpoint, str(checkpoint.parent)):
        model = VGGT.from_pretrained(source, config=config)
        with torch.no_grad():
            out = model(reference["input.images"], reference["input.query_points"])
        assert_matches(out["world_points"], reference["expected.world_points"], "world_points")
    with pytest.raises(WeightsError, match="checkpoint not found"):
        VGGT.from_pretrained(checkpoint.parent / "missing.safetensors", config=config)


def test_disabled_heads_are_not_read(checkpoint, config, state_dict, tensors_read):
    model = VGGT.from_pretrained(checkpoint, config=config, enable_track=False, enable_point=False)
    assert model.track_head is None and model.point_head is None
    assert tensors_read and not any(k.startswith(("track_head.", "point_head.")) for k in tensors_read)
    assert len(tensors_read) == sum(1 for k in state_dict if not k.startswith(("track_head.", "point_head.")))


def test_exporter_loader_reads_heads_only_when_asked(checkpoint, config, state_dict, reference, tensors_read):
    full = load_model(checkpoint=checkpoint, config=config, heads=True)
    assert sorted(tensors_read) == sorted(state_dict)
    with torch.no_grad():
        assert_forward_matches(full(reference["input.images"], reference["input.query_points"]), reference)

    tensors_read.clear()
    aggregator_only = load_model(checkpoint=checkpoint, config=config)
    assert all(getattr(aggregator_only, part) is None for part in HEAD_PARTS)
    assert tensors_read and all(k.startswith("aggregator.") for k in tensors_read)
    assert len(tensors_read) == sum(1 for k in state_dict if k.startswith("aggregator."))


def test_checkpoint_without_heads_is_named(tmp_path, config, state_dict):
    path = tmp_path / "aggregator.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items() if not k.startswith("track_head.")}, path)
    with torch.device("meta"):
        model = VGGT(config=config)
    with pytest.raises(WeightsError, match=r"holds no track_head\.\* tensors.*without those heads"):
        assign_weights(model, checkpoint=path)
