"""Interventions equal brute-force references: dense softmax attention written out with the layer's own
weights, edited by hand."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from vggt.capture import LayerRef
from vggt.intervention_sweep import InterventionRunner
from vggt.interventions import (
    BlockSparsity,
    GlobalToFrame,
    HeadAblation,
    Intervene,
    InterventionError,
    KeyImportanceCapture,
    KeyMask,
    keep_by_mass,
    run_with_interventions,
)
from vggt.models import layers
from vggt.models.config import VGGTConfig
from vggt.models.hooks import iter_hook_points
from vggt.models.vggt import VGGT
from vggt.prefix import PrefixCache, resume_aggregator

from .conftest import FIXTURES

FRAMES, PATCH_START, PATCHES = 3, 5, 20  # the tiny fixtures: 3 frames of 4x5 patches
TOKENS = PATCH_START + PATCHES
HEADS_REFERENCE = FIXTURES / "tiny_vggt_heads_reference"


@pytest.fixture(scope="module")
def heads_reference() -> dict[str, torch.Tensor]:
    return load_file(HEADS_REFERENCE.with_suffix(".safetensors"))


@pytest.fixture(scope="module")
def tiny_model(heads_reference) -> VGGT:
    """The tiny VGGT with all four heads (4 frame and 4 global layers, 2 DINOv2 layers, 4 heads each)."""
    config = VGGTConfig.from_reference_json(json.loads(HEADS_REFERENCE.with_suffix(".json").read_text()))
    model = VGGT(config=config).eval()
    weights = {k.removeprefix("model."): v for k, v in heads_reference.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    return model


@pytest.fixture(scope="module")
def images(heads_reference):
    return heads_reference["input.images"]


def forward(model, images):
    """The aggregator's outputs: every head reads only these, so equal outputs give equal predictions."""
    with torch.no_grad():
        outputs, _ = model.aggregator(images)
    return outputs


def block_of(model, ref: LayerRef):
    aggregator = model.aggregator
    blocks = {"global": aggregator.global_blocks, "frame": aggregator.frame_blocks,
              "dino": aggregator.patch_embed.blocks}[ref.kind]  # fmt: skip
    return blocks[ref.block_index]


def dense_attention(attn, x, pos, keep=None, edit_heads=None):
    """The attention of ``attn`` written out: explicit logits, -inf where ``keep`` is False, softmax,
    per-head outputs edited by ``edit_heads``, then the output projection."""
    batch, tokens, dim = x.shape
    q, k, v = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.rope is not None:
        q, k = attn.rope(q, pos), attn.rope(k, pos)
    logits = (q * attn.head_dim**-0.5) @ k.transpose(-2, -1)
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    heads_out = torch.softmax(logits, dim=-1) @ v
    if edit_heads is not None:
        heads_out = edit_heads(heads_out, q, k)
    return attn.proj(heads_out.transpose(1, 2).reshape(batch, tokens, dim))


def run_with_dense(model, images, ref: LayerRef, **dense_kwargs):
    """Outputs with layer ``ref`` computed by :func:`dense_attention` (the brute-force reference)."""
    attn = block_of(model, ref).attn
    attn.forward = lambda x, pos=None: dense_attention(attn, x, pos, **dense_kwargs)
    try:
        return forward(model, images)
    finally:
        del attn.forward


def assert_outputs_close(got, expected, atol=2e-5):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def assert_outputs_equal(got, expected):
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def assert_changed(got, expected):
    assert not torch.allclose(got[-1], expected[-1], atol=1e-4)


def test_no_intervention_and_keep_everything_are_bit_identical(tiny_model, images, monkeypatch):
    plain = forward(tiny_model, images)
    everything = torch.ones(1, FRAMES, PATCHES, dtype=torch.bool)
    all_layers = tuple(LayerRef(kind, i) for kind in ("global", "frame", "dino") for i in range(2))
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        layers.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(k) or original(*a, **k)
    )
    for interventions in (
        [],
        [KeyMask(all_layers, everything)],
        [BlockSparsity(all_layers, 1.0)],
        [BlockSparsity(all_layers, 1.0, rule="ratio", block_size=4)],
    ):
        calls.clear()
        with torch.no_grad(), Intervene(tiny_model, interventions, FRAMES) as session:
            outputs, _ = tiny_model.aggregator(images)
        assert_outputs_equal(outputs, plain)
        assert session.kept_share == 1.0
        assert len(calls) == 10 and all(call.get("attn_mask") is None for call in calls)
    assert all(not point._forward_hooks for _, point in iter_hook_points(tiny_model))


@pytest.mark.parametrize("ref", [LayerRef("global", 1), LayerRef("frame", 0), LayerRef("dino", 1)])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_head_ablation_equals_editing_the_heads_slice_before_the_projection(tiny_model, images, ref, mode):
    heads = (1, 3)

    def edit(heads_out, q, k):
        heads_out = heads_out.clone()
        for head in heads:
            if mode == "zero":
                heads_out[:, head] = 0.0
            else:
                heads_out[:, head] = heads_out[:, head].mean(dim=-2, keepdim=True)
        return heads_out

    expected = run_with_dense(tiny_model, images, ref, edit_heads=edit)
    (got, _), kept = run_with_interventions(tiny_model.aggregator, images, [HeadAblation(ref, heads, mode)])
    assert_outputs_close(got, expected)
    assert_changed(got, forward(tiny_model, images))
    assert kept == pytest.approx(2 / 4)


def test_global_to_frame_equals_frame_attention_with_the_global_layers_weights(tiny_model, images):
    ref = LayerRef("global", 0)
    attn = block_of(tiny_model, ref).attn
    unhooked = type(attn).forward

    def frame_attention(x, pos=None):
        batch, tokens, dim = x.shape
        frames = tokens // TOKENS
        out = unhooked(attn, x.reshape(batch * frames, TOKENS, dim), pos.reshape(batch * frames, TOKENS, 2))
        return out.reshape(batch, tokens, dim)

    attn.forward = frame_attention
    try:
        expected = forward(tiny_model, images)
    finally:
        del attn.forward
    (got, _), kept = run_with_interventions(tiny_model.aggregator, images, [GlobalToFrame((ref,))])
    assert_outputs_close(got, expected)
    assert_changed(got, forward(tiny_model, images))
    assert kept == pytest.approx(1 / FRAMES)


def test_key_mask_equals_a_dense_softmax_with_masked_keys_at_minus_infinity(tiny_model, images):
    generator = torch.Generator().manual_seed(3)
    keep = torch.rand(1, FRAMES, PATCHES, generator=generator) < 0.4
    refs = (LayerRef("global", 1), LayerRef("frame", 1))
    special = torch.ones(1, FRAMES, PATCH_START, dtype=torch.bool)
    keys = torch.cat((special, keep), dim=-1)  # [1, S, T]: every special token kept
    global_keep = keys.reshape(1, 1, 1, FRAMES * TOKENS)
    frame_keep = keys.reshape(FRAMES, 1, 1, TOKENS)

    attn_global, attn_frame = (block_of(tiny_model, ref).attn for ref in refs)
    attn_global.forward = lambda x, pos=None: dense_attention(attn_global, x, pos, keep=global_keep)
    attn_frame.forward = lambda x, pos=None: dense_attention(attn_frame, x, pos, keep=frame_keep)
    try:
        expected = forward(tiny_model, images)
    finally:
        del attn_global.forward, attn_frame.forward
    (got, _), kept = run_with_interventions(tiny_model.aggregator, images, [KeyMask(refs, keep)])
    assert_outputs_close(got, expected)
    assert_changed(got, forward(tiny_model, images))
    kept_keys = int(keys.sum())
    # Every query keeps the kept keys it can see: all of them (global), its own frame's (frame).
    kept_entries = FRAMES * TOKENS * kept_keys + TOKENS * kept_keys
    assert kept == pytest.approx(kept_entries / ((FRAMES * TOKENS) ** 2 + FRAMES * TOKENS**2))

    # DINOv2 layers mask their own patch tokens with the same mask.
    dino = LayerRef("dino", 0)
    attn = block_of(tiny_model, dino).attn
    attn.forward = lambda x, pos=None: dense_attention(attn, x, pos, keep=frame_keep)
    try:
        expected = forward(tiny_model, images)
    finally:
        del attn.forward
    (got, _), _ = run_with_interventions(tiny_model.aggregator, images, [KeyMask((dino,), keep)])
    assert_outputs_close(got, expected)


def brute_force_block_keep(q, k, block, threshold, rule, special):
    """Block pairs to keep, one query block at a time, in plain Python."""
    batch, heads, tokens, dim = q.shape
    blocks = [range(start, min(start + block, tokens)) for start in range(0, tokens, block)]
    keep = torch.zeros(batch, heads, tokens, tokens, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            pooled_k = [k[b, h, list(rows)].mean(dim=0) for rows in blocks]
            for rows in blocks:
                pooled_q = q[b, h, list(rows)].mean(dim=0)
                scores = torch.softmax(torch.stack([pooled_q @ pk for pk in pooled_k]) * dim**-0.5, dim=0)
                order = sorted(range(len(blocks)), key=lambda j: -float(scores[j]))
                chosen, total = [], 0.0
                for j in order:
                    if rule == "share" and total >= threshold:
                        break
                    if rule == "ratio" and len(chosen) >= math.ceil(threshold * len(blocks)):
                        break
                    chosen.append(j)
                    total += float(scores[j])
                for j, cols in enumerate(blocks):
                    holds_special = any(special[i] for i in rows) or any(special[i] for i in cols)
                    if j in chosen or holds_special:
                        keep[b, h, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
    return keep


@pytest.mark.parametrize(("threshold", "rule"), [(0.5, "share"), (0.8, "share"), (0.3, "ratio")])
def test_block_sparsity_equals_a_dense_softmax_with_dropped_blocks_at_minus_infinity(
    tiny_model, images, threshold, rule
):
    ref, block = LayerRef("global", 1), 8
    special = torch.arange(FRAMES * TOKENS) % TOKENS < PATCH_START

    def keep_from_qk(x, pos):
        attn = block_of(tiny_model, ref).attn
        batch, tokens, dim = x.shape
        q, k, _ = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.rope(attn.q_norm(q), pos), attn.rope(attn.k_norm(k), pos)
        return brute_force_block_keep(q, k, block, threshold, rule, special)

    attn = block_of(tiny_model, ref).attn
    masks = []

    def reference(x, pos=None):
        masks.append(keep_from_qk(x, pos))
        return dense_attention(attn, x, pos, keep=masks[-1])

    attn.forward = reference
    try:
        expected = forward(tiny_model, images)
    finally:
        del attn.forward
    keep = masks[0]
    assert 0 < keep.float().mean() < 1
    (got, _), kept = run_with_interventions(
        tiny_model.aggregator, images, [BlockSparsity((ref,), threshold, rule, block)]
    )
    assert_outputs_close(got, expected)
    assert kept == pytest.approx(keep.float().mean().item())


def test_key_importance_and_mass_masks(tiny_model, images):
    ref = LayerRef("global", 0)
    seen = {}
    point = block_of(tiny_model, ref).attn.hook_qk
    handle = point.register_forward_hook(lambda module, args, output: seen.setdefault("qk", args))
    try:
        with torch.no_grad(), KeyImportanceCapture(tiny_model, ref, FRAMES) as camera:
            tiny_model.aggregator(images)
        with torch.no_grad(), KeyImportanceCapture(tiny_model, ref, FRAMES, "query_frame") as patches:
            tiny_model.aggregator(images)
    finally:
        handle.remove()
    q, k = seen["qk"]
    probs = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)[0]  # [heads, N, N]
    cameras = torch.arange(FRAMES) * TOKENS
    expected = probs[:, cameras].mean(dim=(0, 1)).reshape(1, FRAMES, TOKENS)
    torch.testing.assert_close(camera.importance, expected, atol=1e-6, rtol=0)
    expected = probs[:, PATCH_START:TOKENS].mean(dim=(0, 1)).reshape(1, FRAMES, TOKENS)
    torch.testing.assert_close(patches.importance, expected, atol=1e-6, rtol=0)

    importance = camera.importance
    special_mass = float(importance[..., :PATCH_START].sum())
    for mass in (0.3, 0.5, 0.7, 0.95):
        keep = keep_by_mass(importance, mass, PATCH_START)
        assert keep.shape == (1, FRAMES, PATCHES)
        values = importance[..., PATCH_START:]
        kept = special_mass + float(values[keep].sum())
        assert kept >= mass - 1e-6
        if keep.any():  # the fewest patches: without the least important kept one, the mass is short
            assert kept - float(values[keep].min()) < mass
            assert float(values[keep].min()) >= float(values[~keep].max())
    assert keep_by_mass(importance, 1.0, PATCH_START).all()
    assert not keep_by_mass(importance, special_mass / 2, PATCH_START).any()


def test_bad_interventions_are_one_line_errors(tiny_model, images):
    cases = [
        (HeadAblation(LayerRef("global", 4), (0,)), "global layer 5 does not exist: the model has 1-4"),
        (HeadAblation(LayerRef("global", 0), (4,)), "head 5 does not exist: global layer 1 has heads 1-4"),
        (HeadAblation(LayerRef("frame", 0), (0,), "half"), "ablation mode must be one of zero, mean"),
        (GlobalToFrame((LayerRef("frame", 0),)), "frame layers cannot be edited this way"),
        (BlockSparsity((LayerRef("global", 0),), 1.5), r"threshold must be in \(0, 1\], got 1.5"),
        (BlockSparsity((LayerRef("global", 0),), 0.0), r"threshold must be in \(0, 1\], got 0.0"),
        (GlobalToFrame(()), "no global layer"),
    ]
    for intervention, message in cases:
        with pytest.raises(InterventionError, match=message):
            run_with_interventions(tiny_model.aggregator, images, [intervention])
    for mass in (0.0, -0.1, 1.01):
        with pytest.raises(InterventionError, match=r"kept mass must be in \(0, 1\]"):
            keep_by_mass(torch.rand(1, FRAMES, TOKENS), mass, PATCH_START)
    assert all(not point._forward_hooks for _, point in iter_hook_points(tiny_model))


def test_hooks_are_removed_when_the_forward_pass_fails(tiny_model, images):
    ablation = HeadAblation(LayerRef("global", 0), (0,))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        run_with_interventions(
            tiny_model.aggregator, images[..., :60], [ablation, GlobalToFrame((LayerRef("global", 1),))]
        )
    assert all(not point._forward_hooks for _, point in iter_hook_points(tiny_model))
    assert_outputs_equal(forward(tiny_model, images), forward(tiny_model, images))


@pytest.mark.parametrize(
    "intervention",
    [
        HeadAblation(LayerRef("dino", 1), (2,)),
        HeadAblation(LayerRef("frame", 1), (0,), "mean"),
        GlobalToFrame((LayerRef("global", 0), LayerRef("global", 1))),
        BlockSparsity((LayerRef("global", 1), LayerRef("frame", 1)), 0.5, block_size=8),
    ],
    ids=lambda intervention: type(intervention).__name__,
)
def test_prefix_reuse_equals_running_from_scratch(tiny_model, images, intervention):
    first = intervention.first_layer()
    everywhere = [LayerRef("dino", i) for i in range(2)]
    everywhere += [LayerRef(kind, i) for kind in ("frame", "global") for i in range(4)]
    with torch.no_grad(), PrefixCache(tiny_model, everywhere) as cache:
        plain = forward(tiny_model, images)
    assert set(cache.tokens) == set(everywhere)
    (scratch, _), _ = run_with_interventions(tiny_model.aggregator, images, [intervention])
    assert_changed(scratch, plain)
    # From the layer it first edits, and from any recorded layer before that one.
    starts = [ref for ref in everywhere if ref.forward_position <= first.forward_position]
    assert cache.resume_point(first) == first
    for start in starts:
        with torch.no_grad(), Intervene(tiny_model, [intervention], FRAMES):
            resumed, _ = resume_aggregator(tiny_model.aggregator, images, cache, start)
        assert_outputs_equal(resumed, scratch)


def test_prefix_cache_keeps_only_what_resuming_needs(tiny_model, images):
    start = LayerRef("global", 1)
    with torch.no_grad(), PrefixCache(tiny_model, [start], kept_outputs=()) as cache:
        plain = forward(tiny_model, images)
    assert list(cache.tokens) == [start] and cache.outputs == {}
    assert cache.tokens[start].shape == (1, FRAMES, TOKENS, 64)
    with torch.no_grad():
        resumed, _ = resume_aggregator(tiny_model.aggregator, images, cache, start)
    assert resumed[0] is None and torch.equal(resumed[1], plain[1])
    cache.release(start)
    assert cache.tokens == {} and cache.resume_point(start) is None
    assert all(not module._forward_pre_hooks for module in tiny_model.modules())


def prediction_tensors(predictions: dict) -> list[torch.Tensor]:
    names = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf", "track", "vis", "conf")
    return [predictions[name] for name in names]


def test_a_sweep_resumes_each_intervention_and_predicts_what_running_from_scratch_predicts(
    tiny_model, images, heads_reference
):
    query_points = heads_reference["input.query_points"][0]
    with torch.no_grad():
        plain = tiny_model(images, query_points)
    global_ablation = HeadAblation(LayerRef("global", 2), (1,))
    dino_ablation = HeadAblation(LayerRef("dino", 1), (0,), "mean")
    runner = InterventionRunner(tiny_model, images[0], query_points)
    unmodified = runner.run_unmodified(resume_at=[LayerRef("global", 2), LayerRef("dino", 1)])
    assert_outputs_equal(prediction_tensors(unmodified), prediction_tensors(plain))
    # The heads read all 4 outputs of the tiny model: the 2 before global layer 3 are kept.
    assert sorted(runner.cache.outputs) == [0, 1]

    everything = KeyMask((LayerRef("global", 2),), torch.ones(1, FRAMES, PATCHES, dtype=torch.bool))
    kept_all, share = runner.run([everything])
    assert_outputs_equal(prediction_tensors(kept_all), prediction_tensors(plain))
    assert share == 1.0

    results = list(runner.sweep([global_ablation, dino_ablation]))
    assert [intervention for intervention, _, _ in results] == [dino_ablation, global_ablation]
    assert runner.cache.tokens == {}  # every prefix released once used
    for intervention, predictions, share in results:
        with torch.no_grad():
            scratch, _ = run_with_interventions(tiny_model, images, [intervention], query_points=query_points)
        assert_outputs_equal(prediction_tensors(predictions), prediction_tensors(scratch))
        assert_changed(prediction_tensors(predictions), prediction_tensors(plain))
        assert share == pytest.approx(3 / 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["float32", "bf16 autocast"])
def test_interventions_on_cuda_match_the_cpu(tiny_model, images, heads_reference, dtype):
    cuda_model = copy.deepcopy(tiny_model).to("cuda")
    query_points = heads_reference["input.query_points"][0]
    keep = torch.rand(1, FRAMES, PATCHES, generator=torch.Generator().manual_seed(0)) < 0.5
    layers = (LayerRef("global", 1), LayerRef("global", 2))
    interventions = [
        HeadAblation(LayerRef("frame", 1), (2,), "mean"),
        KeyMask(layers, keep),
        GlobalToFrame((LayerRef("global", 0),)),
        BlockSparsity(layers, 0.5, block_size=8),
    ]
    for intervention in interventions:
        cpu = InterventionRunner(tiny_model, images[0], query_points)
        cpu.run_unmodified([intervention.first_layer()])
        expected, expected_kept = cpu.run([intervention])
        gpu = InterventionRunner(cuda_model, images[0].cuda(), query_points.cuda(), autocast_dtype=dtype)
        gpu.run_unmodified([intervention.first_layer()])
        got, kept = gpu.run([intervention])
        tolerance = 1e-3 if dtype is None else 0.1
        for name in ("depth", "world_points"):
            torch.testing.assert_close(
                got[name].float().cpu(), expected[name], rtol=tolerance, atol=tolerance
            )
        if not isinstance(intervention, BlockSparsity) or dtype is None:  # bf16 may pick other blocks
            assert kept == pytest.approx(expected_kept)
