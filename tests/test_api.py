"""The API at the top of the package: vggt.load_model, capture_attention, export_attention, open_export.

On the tiny reference model; every expected value is upstream's attention (tests/reference.py) or what
the exporter writes for the same pass.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vggt
from tests.reference import expected_pooled
from vggt.arguments import command_line_spelling
from vggt.export import ExportError
from vggt.weights import WeightsError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGES = REPO / "examples" / "synthetic_room" / "images"


def test_the_package_and_its_reader_import_without_torch(tmp_path) -> None:
    """``import vggt``, its API's names and an opened export need no torch: it is blocked here."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from vggt import capture_attention, export_attention, load_model, open_export\n"
        "from vggt.testing.synthetic import write_synthetic_export\n"
        "assert callable(load_model) and callable(capture_attention) and callable(export_attention)\n"
        "export = open_export(write_synthetic_export(Path(sys.argv[1])))\n"
        "print(export.query_maps('layer_01', 0).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "export")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 4, 5)"


def tiny_vggt(tiny_model_files, **kwargs):
    files = tiny_model_files
    return vggt.load_model(checkpoint=files.checkpoint, config=files.config_object, **kwargs)


@pytest.mark.parametrize(("per_head", "stride"), [(True, 1), (False, (3, 2)), (True, 2)])
def test_captured_maps_are_upstreams_attention_exactly(tiny_model, tiny_reference, per_head, stride):
    images = tiny_reference["input.images"][0]
    captured = vggt.capture_attention(tiny_model, images, per_head=per_head, stride=stride)
    assert captured.layer_names == ["layer_01", "layer_02"]
    stride_h, stride_w = (stride, stride) if isinstance(stride, int) else stride
    for layer, name in enumerate(captured.layer_names):
        want, want_special = expected_pooled(tiny_reference, layer, stride_h, stride_w, per_head)
        got = np.stack([captured.query_maps(name, qi) for qi in range(captured.layer_meta(name)["Q"])])
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)  # float32, not quantized
        np.testing.assert_allclose(captured.special_mass(name), want_special, rtol=1e-5, atol=1e-7)
        if per_head:
            np.testing.assert_array_equal(captured.query_maps(name, 3, head=2), got[3, 2])
    assert len(captured.frames()) == 3 and captured.frames()[0].dtype == np.uint8


@pytest.mark.parametrize("precision", ["uint8", "float16"])
def test_saved_capture_opens_with_the_same_maps_and_equals_the_export(tiny_model, tiny_reference, tmp_path,
                                                                      precision):  # fmt: skip
    images = tiny_reference["input.images"][0]
    kinds = {"blocks": "global,frame", "rollout": True, "per_head": True, "stride": 2}
    captured = vggt.capture_attention(tiny_model, images, **kinds)
    saved = vggt.open_export(captured.save(tmp_path / "saved", precision=precision))
    assert saved.layer_names == captured.layer_names == ["global_01", "global_02", "frame_01", "frame_02",
                                                         "rollout"]  # fmt: skip
    for name in saved.layer_names:
        meta = saved.layer_meta(name)
        for qi in range(meta["Q"]):
            exact, read = captured.query_maps(name, qi), saved.query_maps(name, qi)
            if precision == "float16":
                np.testing.assert_allclose(read, exact, rtol=1e-3, atol=1e-6)
                continue
            heads = meta["per_head_vmax99"] or [meta["layer_vmax99"]]
            scale = np.asarray(heads, np.float32).reshape(-1, *(1,) * (exact.ndim - 1))
            scale = scale if meta["per_head_data"] else scale[0]
            # Within half a code, values above vmax99 clipped to it, as the schema says.
            assert np.all(np.abs(read - np.minimum(exact, scale)) <= scale / 255 * 0.5 + 1e-7)
        last_token = len(meta["token_queries"]) - 1
        assert saved.token_maps(name, last_token).shape == captured.token_maps(name, last_token).shape
        largest = max(meta["per_head_vmax99"] or [meta["layer_vmax99"]])
        np.testing.assert_allclose(
            saved.key_maps(name, 0, 1, 1), captured.key_maps(name, 0, 1, 1), atol=largest
        )
    # The same pass exported directly gives the same files, byte for byte.
    out = tmp_path / "exported"
    vggt.export_attention(tiny_model, images, out, precision=precision, progress=False, **kinds)
    exported = vggt.open_export(out)
    for name in saved.layer_names:
        np.testing.assert_array_equal(np.asarray(saved.heatmaps(name)), np.asarray(exported.heatmaps(name)))
        assert saved.layer_meta(name) == exported.layer_meta(name)
    np.testing.assert_array_equal(saved.frames()[1], captured.frames()[1])


def test_images_from_a_folder_or_files_with_their_names(tiny_model, tmp_path):
    paths = sorted(EXAMPLE_IMAGES.glob("*.png"))[:2]
    from_files = vggt.capture_attention(tiny_model, paths, layers=[2], preprocess="pad")
    assert from_files.layer_names == ["layer_02"] and from_files.frame_sources == [p.name for p in paths]
    assert from_files.manifest["preprocess_mode"] == "pad"
    folder = tmp_path / "images"
    folder.mkdir()
    for path in paths:
        (folder / path.name).write_bytes(path.read_bytes())
    from_folder = vggt.capture_attention(tiny_model, folder, layers="2")
    assert from_folder.frame_sources == [p.name for p in paths]
    out = vggt.export_attention(tiny_model, folder, tmp_path / "e", layers="1", progress=False)
    export = vggt.open_export(out)
    assert export.layer_names == ["layer_01"] and export.manifest["preprocess_mode"] == "crop"


def test_a_loaded_models_autocast_is_the_exports(tiny_model_files, tiny_reference, tmp_path):
    """``vggt.load_model`` keeps the dtype the command line would choose; exports run under it."""
    model = tiny_vggt(tiny_model_files)
    assert model.autocast_dtype is None and next(model.parameters()).device.type == "cpu"  # "auto" on a CPU
    images = tiny_reference["input.images"][0]
    plain = vggt.open_export(vggt.export_attention(model, images, tmp_path / "a", progress=False))
    assert plain.manifest["autocast_dtype"] is None and plain.manifest["device"] == "cpu"
    bf16 = tiny_vggt(tiny_model_files, dtype="bfloat16")
    assert bf16.autocast_dtype == torch.bfloat16
    export = vggt.open_export(vggt.export_attention(bf16, images, tmp_path / "b", progress=False))
    assert export.manifest["autocast_dtype"] == "bfloat16"
    assert vggt.capture_attention(bf16, images).manifest["autocast_dtype"] == "bfloat16"


def test_errors_name_the_callers_arguments(tiny_model, tiny_reference, tmp_path, monkeypatch):
    images = tiny_reference["input.images"][0]
    with pytest.raises(ExportError, match=r"got stride_h=0, stride_w=0$"):
        vggt.capture_attention(tiny_model, images, stride=0)
    with pytest.raises(ExportError, match=r"^bad layers='1-x': use numbers"):
        vggt.capture_attention(tiny_model, images, layers="1-x")
    with pytest.raises(ExportError, match=r"already exists \(pass overwrite=True to replace it\)"):
        vggt.export_attention(tiny_model, images, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"^unknown device='tpu'"):
        vggt.load_model(random_weights=True, device="tpu")
    with pytest.raises(WeightsError, match=r"^checkpoint=PATH and random_weights=True exclude each other$"):
        vggt.load_model(checkpoint="model.pt", random_weights=True)
    # No weights offline: the message says how to get them, in a Python caller's words.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError) as info:
        vggt.load_model(cache_dir=tmp_path / "empty-cache")
    message = str(info.value)
    assert "checkpoint=PATH" in message and "random_weights=True" in message and "--" not in message.split(
        "hf download")[0]  # fmt: skip
    assert "--random_weights" in info.value.spelled(command_line_spelling({"model_id": "model"}))
