"""The model computes exactly what upstream VGGT computes, and exposes q/k at its hook points."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vggt.models import layers
from vggt.models.config import AggregatorConfig
from vggt.models.hooks import StopAfter, iter_hook_points
from vggt.models.vggt import VGGT

from .conftest import FIXTURES


def attention_probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``[B, heads, N, N]`` from hooked ``q, k`` ``[B, heads, N, head_dim]``."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)


def record_attention(model: VGGT, images: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    probs: dict[str, torch.Tensor] = {}
    handles = []
    for name, point in iter_hook_points(model, "attn.hook_qk"):

        def hook(module, args, output, name=name):
            probs[name] = attention_probabilities(*args)

        handles.append(point.register_forward_hook(hook))
    try:
        with torch.no_grad():
            outputs, _ = model.aggregator(images)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, probs


def test_tiny_reference_config_builds(tiny_config):
    assert tiny_config.embed_dim == 64 and tiny_config.depth == 2 and tiny_config.num_heads == 4
    assert tiny_config.patch_embed.depth == 2 and tiny_config.patch_start_idx == 5


def test_tiny_model_tokens_and_attention_match_upstream(tiny_model, tiny_reference):
    images = tiny_reference["input.images"]
    outputs, probs = record_attention(tiny_model, images)
    assert len(outputs) == 2
    for i, out in enumerate(outputs):
        expected = tiny_reference[f"expected.aggregated_tokens.{i}"]
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    prefixes = {
        "dino": "aggregator.patch_embed.blocks",
        "frame": "aggregator.frame_blocks",
        "global": "aggregator.global_blocks",
    }
    checked = 0
    for kind, prefix in prefixes.items():
        for i in range(2):
            expected = tiny_reference[f"expected.attn.{kind}.{i}"]
            got = probs[f"{prefix}.{i}.attn.hook_qk"]
            assert got.shape == expected.shape, kind
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            checked += 1
    assert checked == 6


def test_hook_sees_q_and_k_with_expected_shapes(tiny_model, tiny_reference):
    images = tiny_reference["input.images"]  # [1, 3 frames, 3, 56, 70] -> 4x5 patches
    tokens_per_frame = 5 + 4 * 5
    seen = {}

    def hook(module, args, output):
        seen["args"] = args
        seen["output"] = output

    handle = tiny_model.aggregator.global_blocks[1].attn.hook_qk.register_forward_hook(hook)
    with torch.no_grad():
        tiny_model.aggregator(images)
    handle.remove()
    q, k = seen["args"]
    assert q.shape == k.shape == (1, 4, 3 * tokens_per_frame, 16)
    assert seen["output"][0] is q and seen["output"][1] is k

    frame_shapes = {}

    def frame_hook(module, args, output):
        frame_shapes["q"] = args[0].shape

    handle = tiny_model.aggregator.frame_blocks[0].attn.hook_qk.register_forward_hook(frame_hook)
    with torch.no_grad():
        tiny_model.aggregator(images)
    handle.remove()
    assert frame_shapes["q"] == (3, 4, tokens_per_frame, 16)


def test_outputs_bit_identical_with_and_without_hooks(tiny_model, tiny_reference):
    images = tiny_reference["input.images"]
    with torch.no_grad():
        plain, _ = tiny_model.aggregator(images)
    hooked, probs = record_attention(tiny_model, images)
    assert len(probs) == 6
    for a, b in zip(plain, hooked, strict=True):
        assert torch.equal(a, b)
    # Hooks are gone afterwards.
    assert all(not point._forward_hooks for _, point in iter_hook_points(tiny_model))


def test_forward_without_hooks_uses_fused_attention_only(tiny_model, tiny_reference, monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", counting_sdpa)
    softmax_calls = []
    monkeypatch.setattr(torch, "softmax", lambda *a, **k: softmax_calls.append(1))
    with torch.no_grad():
        tiny_model.aggregator(tiny_reference["input.images"])
    assert len(calls) == 6  # 2 DINOv2 + 2 frame + 2 global blocks, one fused call each
    assert softmax_calls == []


def test_vggt_1b_names_and_shapes_equal_upstream():
    reference = json.loads((FIXTURES / "vggt_1b_state_dict_shapes.json").read_text())
    expected = {k: tuple(v) for k, v in reference.items()}
    assert len(expected) == 1797
    with torch.device("meta"):
        model = VGGT()
        aggregator_only = VGGT(
            enable_camera=False, enable_point=False, enable_depth=False, enable_track=False
        )
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert list(got) == list(expected)  # upstream's order too
    assert {k: tuple(v.shape) for k, v in aggregator_only.state_dict().items()} == {
        k: v for k, v in expected.items() if k.startswith("aggregator.")
    }
    assert sum(v.numel() for v in aggregator_only.parameters()) > 900_000_000


def test_keep_outputs_false_returns_last_block_only(tiny_model, tiny_reference):
    images = tiny_reference["input.images"]
    with torch.no_grad():
        full, start = tiny_model.aggregator(images)
        last_only, start2 = tiny_model.aggregator(images, keep_outputs=False)
    assert start == start2 == 5
    assert len(last_only) == 1 and torch.equal(last_only[0], full[-1])


def test_image_size_must_be_multiple_of_patch(tiny_model):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_model.aggregator(torch.rand(1, 2, 3, 56, 60))


def test_other_configs_build_and_run():
    config = AggregatorConfig.from_dict(
        {
            "embed_dim": 32,
            "depth": 1,
            "num_heads": 2,
            "num_register_tokens": 2,
            "img_size": 28,
            "patch_embed": {
                "embed_dim": 32,
                "depth": 1,
                "num_heads": 2,
                "num_register_tokens": 2,
                "img_size": 28,
            },
        }
    )
    model = VGGT.from_config(config, heads=False).eval()
    with torch.no_grad():
        outputs, start = model.aggregator(torch.rand(1, 2, 3, 42, 28))
    assert start == 3 and outputs[0].shape == (1, 2, 3 + 6, 64)


def test_stop_after_ends_the_forward_pass_there(tiny_model, tiny_reference):
    images = tiny_reference["input.images"]
    aggregator = tiny_model.aggregator
    point = aggregator.global_blocks[0].attn.hook_qk
    seen = []
    point.register_forward_hook(lambda *_: seen.append("earlier hook"))
    for block in (aggregator.global_blocks[0], aggregator.frame_blocks[1], aggregator.global_blocks[1]):
        block.register_forward_hook(lambda *_: seen.append("later block"))
    try:
        with torch.no_grad(), StopAfter(point) as stop:
            aggregator(images)
        assert stop.stopped
        assert seen == ["earlier hook"]  # hooks attached before it run; nothing after it does
        assert len(point._forward_hooks) == 1  # its own hook is gone

        # Its exception is swallowed only by the session that raised it; other errors pass through.
        after_inner = []
        with StopAfter(point) as outer:
            with StopAfter(aggregator.global_blocks[1].attn.hook_qk) as inner:
                aggregator(images)
            after_inner.append(True)
        assert outer.stopped and not inner.stopped and not after_inner

        def broken(*_):
            raise RuntimeError("hook failed")

        handle = point.register_forward_hook(broken)
        with pytest.raises(RuntimeError, match="hook failed"), StopAfter(point):
            aggregator(images)
        handle.remove()
    finally:
        for module in aggregator.modules():
            module._forward_hooks.clear()
    with torch.no_grad():
        aggregator(images)  # runs to the end again


def test_run_blocks_resumed_from_recorded_tokens_equals_the_full_forward(tiny_model, tiny_reference):
    images = tiny_reference["input.images"]
    aggregator = tiny_model.aggregator
    entering: dict[tuple[str, int], torch.Tensor] = {}
    handles = [
        block.register_forward_pre_hook(lambda module, args, key=(kind, i): entering.setdefault(key, args[0]))
        for kind, blocks in (
            ("dino", aggregator.patch_embed.blocks),
            ("frame", aggregator.frame_blocks),
            ("global", aggregator.global_blocks),
        )
        for i, block in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            full, _ = aggregator(images)
    finally:
        for handle in handles:
            handle.remove()
    batch, frames = images.shape[:2]
    with torch.no_grad():
        tokens, pos = aggregator.embed(images)
        for i in range(aggregator.depth):
            frame_in = entering["frame", i].unflatten(0, (batch, frames))
            assert all(map(torch.equal, aggregator.run_blocks(frame_in, pos, first_block=i), full[i:]))
            global_in = entering["global", i].unflatten(1, (frames, -1))
            resumed = aggregator.run_blocks(global_in, pos, first_block=i, from_global=True)
            assert all(map(torch.equal, resumed, full[i:]))
        for j in range(len(aggregator.patch_embed.blocks)):
            resumed_tokens, resumed_pos = aggregator.embed(images, entering["dino", j], dino_first_block=j)
            assert torch.equal(resumed_tokens, tokens) and torch.equal(resumed_pos, pos)


def test_mask_and_head_output_hook_points_edit_the_attention(tiny_model, tiny_reference):
    images = tiny_reference["input.images"]
    attention = tiny_model.aggregator.global_blocks[1].attn
    seen = {}

    def keep_first_key_only(module, args, mask):
        q, k = args
        seen["mask_in"] = mask
        keep = torch.zeros(k.shape[-2], dtype=torch.bool)
        keep[0] = True
        return keep.view(1, -1)

    def read_heads(module, args, output):
        seen["heads"] = output[0]

    handles = [
        attention.hook_attn_mask.register_forward_hook(keep_first_key_only),
        attention.hook_head_outputs.register_forward_hook(read_heads),
    ]
    try:
        with torch.no_grad():
            tiny_model.aggregator(images)
    finally:
        for handle in handles:
            handle.remove()
    assert seen["mask_in"] is None
    # Every query attends to key 0 only, so each head's output is key 0's value in every row.
    heads = seen["heads"]
    assert heads.shape == (1, 4, 3 * 25, 16)
    torch.testing.assert_close(heads, heads[:, :, :1].expand_as(heads))
