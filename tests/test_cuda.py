"""The exporter on a GPU: the tiny reference model on CUDA, in float32 and under bf16/fp16 autocast.

Skipped where torch sees no CUDA device (CI); run them on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.reference import expected_pooled
from tests.test_device_quantize import assert_same_encoding, attention_like, half_codes
from tests.test_export import dequantized
from tests.test_export_kinds import all_rows, all_token_rows
from vggt import export as export_module
from vggt import rollout as rollout_module
from vggt.attn_format import open_export
from vggt.export import ExportOptions, export_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EVERY_KIND = {"blocks": ("global", "frame", "dino"), "rollout": True}


@pytest.fixture()
def cuda_model(tiny_model):
    return tiny_model.to("cuda")


def export_on(model, reference, out, dtype=None, **options):
    images, options = reference["input.images"][0], ExportOptions(**options)
    written = export_attention(model, images, out, options=options, autocast_dtype=dtype, progress=False)
    return open_export(written)


@pytest.mark.parametrize(("per_head", "stride_h", "stride_w"), [(False, 1, 1), (True, 1, 1), (True, 3, 2)])
def test_float32_maps_on_cuda_equal_upstream_attention(cuda_model, tiny_reference, tmp_path, per_head,
                                                       stride_h, stride_w):  # fmt: skip
    raw = export_on(cuda_model, tiny_reference, tmp_path / "raw", per_head=per_head, stride_h=stride_h,
                    stride_w=stride_w, precision="float16")  # fmt: skip
    quantized = export_on(cuda_model, tiny_reference, tmp_path / "u8", per_head=per_head, stride_h=stride_h,
                          stride_w=stride_w)  # fmt: skip
    for layer, name in enumerate(raw.layer_names):
        want, want_special = expected_pooled(tiny_reference, layer, stride_h, stride_w, per_head)
        np.testing.assert_allclose(dequantized(raw, name), want, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(raw.special_mass(name), want_special, rtol=1e-3, atol=1e-6)
        meta = quantized.layer_meta(name)
        if per_head:
            scale = np.asarray(meta["per_head_vmax99"])[None, :, None, None, None]
            np.testing.assert_allclose(meta["per_head_vmax99"], np.percentile(want, 99, axis=(0, 2, 3, 4)),
                                       rtol=1e-4)  # fmt: skip
        else:
            scale = meta["layer_vmax99"]
            assert scale == pytest.approx(np.percentile(want, 99), rel=1e-4)
        # Half a code, plus what the GPU's float32 arithmetic may move a value across a rounding edge.
        error = np.abs(dequantized(quantized, name) - np.minimum(want, scale))
        assert np.all(error <= scale / 255 * 0.5 + 1e-4), error.max()


@pytest.mark.parametrize("gpu_free", [None, 0], ids=["kept on the GPU", "GPU full: host memory"])
def test_every_kind_and_rollout_on_cuda_match_the_cpu(tiny_model, tiny_reference, tmp_path, monkeypatch,
                                                      gpu_free):  # fmt: skip
    on_cpu = export_on(tiny_model, tiny_reference, tmp_path / "cpu", precision="float16", **EVERY_KIND)
    chosen = []

    def spy_storage(device, needed_bytes):
        if gpu_free is not None:
            monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gpu_free, 80 << 30))
        chosen.append(real_storage(device, needed_bytes))
        return chosen[-1]

    real_storage = rollout_module.rollout_storage
    monkeypatch.setattr(rollout_module, "rollout_storage", spy_storage)
    encoded_on_gpu = []

    def spy_encode(maps, *args):
        encoded_on_gpu.append(maps.device.type)
        return real_encode(maps, *args)

    real_encode = export_module.encode_layer_on_device
    monkeypatch.setattr(export_module, "encode_layer_on_device", spy_encode)
    on_gpu = export_on(tiny_model.to("cuda"), tiny_reference, tmp_path / "gpu", precision="float16",
                       **EVERY_KIND)  # fmt: skip
    assert on_gpu.layer_names == on_cpu.layer_names and "rollout" in on_gpu.layer_names
    assert [device.type for device in chosen] == ["cuda" if gpu_free is None else "cpu"]
    # Every layer, rollout included (patch and token queries), quantized on the GPU, or none when it is full.
    assert encoded_on_gpu == (["cuda"] * 2 * len(on_gpu.layer_names) if gpu_free is None else [])
    for name in on_cpu.layer_names:
        np.testing.assert_allclose(all_rows(on_gpu, name), all_rows(on_cpu, name), rtol=2e-3, atol=1e-5)
        np.testing.assert_allclose(all_token_rows(on_gpu, name), all_token_rows(on_cpu, name), rtol=2e-3,
                                   atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_on_cuda_keeps_float32_probabilities(cuda_model, tiny_reference, tmp_path, autocast_dtype):
    export = export_on(cuda_model, tiny_reference, tmp_path / "e", autocast_dtype, per_head=True,
                       precision="float16")  # fmt: skip
    for layer, name in enumerate(export.layer_names):
        maps = dequantized(export, name).astype(np.float64)
        total = maps.sum(axis=(-3, -2, -1)) + export.special_mass(name).astype(np.float64).sum(axis=(-2, -1))
        np.testing.assert_allclose(total, 1.0, atol=2e-3)
        want, _ = expected_pooled(tiny_reference, layer, 1, 1, True)
        # Half-precision activations move the attention a little; it stays close to float32's.
        np.testing.assert_allclose(maps, want, atol=0.05)


def test_cli_on_cuda_records_device_and_dtype(tiny_cli, tmp_path):
    out = tmp_path / "out"
    assert tiny_cli("--num_images", "3", "--device", "cuda", "--dtype", "fp16", "--save_per_head",
                    "--rollout", "--output_dir", str(out)) == 0  # fmt: skip
    export = open_export(out)
    export.validate()
    assert export.manifest["device"].startswith("cuda") and export.manifest["autocast_dtype"] == "float16"
    maps = dequantized(export, "layer_02")
    assert maps.shape[1] == 4 and np.isfinite(maps).all() and maps.max() > 0


@pytest.mark.parametrize("precision", ["uint8", "float16"])
def test_gpu_quantizer_matches_numpy_byte_for_byte(precision):
    averaged = half_codes(attention_like((60, 3, 8, 8), seed=0))
    assert_same_encoding(averaged, precision, "cuda")
    by_head = attention_like((4, 60, 3, 8, 8), seed=1)
    by_head[2] = half_codes(by_head[2])
    per_head = by_head.transpose(1, 0, 2, 3, 4)
    assert_same_encoding(per_head, precision, "cuda", per_head.mean(axis=1, dtype=np.float32))
