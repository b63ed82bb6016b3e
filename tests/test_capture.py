"""The capture of one layer on its own: tiles of rows computed in parallel equal a plain softmax; and
the layers handed over, one by one, during a forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.reference import pool, query_rows
from vggt import capture
from vggt.capture import AttentionCapture, LayerRef, QueryGrid, SequenceLayout, Workspace, capture_layer

GRID = QueryGrid(grid_h=6, grid_w=5, stride_h=2, stride_w=2)
LAYOUT = SequenceLayout(
    key_frames=3, patch_start=2, special_tokens=("camera", "register_1"), special_queries=(0, 1, 2)
)
HEADS, HEAD_DIM = 3, 8


def plain_attention(q: torch.Tensor, k: torch.Tensor) -> np.ndarray:
    """``softmax(q k^T / sqrt(d))`` in float64, ``[heads, N, N]``."""
    q64, k64 = q[0].double(), k[0].double()
    return torch.softmax(q64 @ k64.transpose(-2, -1) / HEAD_DIM**0.5, dim=-1).numpy()


def pooled_by_hand(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the query grid's patches, then of the camera tokens, pooled as the tests' reference does.

    Returns maps ``[heads, R, S, H_ds, W_ds]`` and special mass ``[heads, R, S, 2]``.
    """
    per_frame = LAYOUT.patch_start + GRID.num_patches
    patch_rows = query_rows(GRID.grid_h, GRID.grid_w, GRID.stride_h, GRID.stride_w, LAYOUT.patch_start)
    rows = patch_rows + [frame * per_frame for frame in LAYOUT.special_queries]
    grid = (GRID.grid_h, GRID.grid_w, GRID.stride_h, GRID.stride_w)
    return pool(probs[:, rows], LAYOUT.key_frames, *grid, special=LAYOUT.patch_start)


@pytest.mark.parametrize("per_head", [True, False])
def test_parallel_tiles_equal_plain_softmax(monkeypatch, per_head):
    # Tiles of two rows each, so that the 18 query rows are split over several threads.
    num_tokens = LAYOUT.key_frames * (LAYOUT.patch_start + GRID.num_patches)
    monkeypatch.setattr(capture, "_TILE_BYTES", 2 * 4 * num_tokens)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, num_tokens, HEAD_DIM, generator=generator) * 2
    k = torch.randn(1, HEADS, num_tokens, HEAD_DIM, generator=generator) * 2
    maps, special = pooled_by_hand(plain_attention(q, k))
    queries = GRID.num_queries
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with torch.inference_mode():  # as inside the exporter's forward pass
            layer = capture_layer(q, k, LayerRef("global", 0), LAYOUT, GRID, per_head, Workspace())
        assert torch.get_num_threads() == 3  # the workers' single-threaded setting does not leak out
    finally:
        torch.set_num_threads(threads)
    if per_head:
        expected = maps.swapaxes(0, 1), special.swapaxes(0, 1)
        np.testing.assert_allclose(layer.head_mean.numpy(), maps[:, :queries].mean(axis=0), atol=1e-6)
    else:
        expected = maps.mean(axis=0), special.mean(axis=0)
        assert layer.head_mean is None
    np.testing.assert_allclose(layer.maps.numpy(), expected[0][:queries], atol=1e-6)
    np.testing.assert_allclose(layer.special_mass.numpy(), expected[1][:queries], atol=1e-6)
    np.testing.assert_allclose(layer.token_maps.numpy(), expected[0][queries:], atol=1e-6)
    np.testing.assert_allclose(layer.token_special_mass.numpy(), expected[1][queries:], atol=1e-6)


def test_workspace_keeps_gpu_buffers_only_while_they_fit(monkeypatch):
    free = {"bytes": 10 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    workspace, gpu = Workspace(), torch.device("cuda:0")
    assert workspace.place(torch.device("cpu"), 1 << 40) == torch.device("cpu")
    assert workspace.place(gpu, 5 << 30) == gpu  # half of the free memory
    free["bytes"] = 1 << 30
    assert workspace.place(gpu, 5 << 30) == torch.device("cpu")
    free["bytes"] = 10 << 30
    assert workspace.place(gpu, 1) == torch.device("cpu")  # once in host memory, it stays there


def capture_global_layers(model, images: torch.Tensor, on_layer) -> None:
    """One forward pass over ``images`` ``[S, 3, H, W]``, every global layer captured per head."""
    aggregator = model.aggregator
    grid = QueryGrid(images.shape[-2] // aggregator.patch_size, images.shape[-1] // aggregator.patch_size)
    layers = [LayerRef("global", index) for index in range(len(aggregator.global_blocks))]
    with AttentionCapture(aggregator, grid, layers, images.shape[0], True, on_layer), torch.inference_mode():
        aggregator(images[None], keep_outputs=False)


def test_each_layer_is_handed_over_in_its_hook_and_an_error_ends_the_pass(tiny_model, tiny_reference):
    """The consumer sees each layer's own maps while the pass waits in its hook; an error it raises
    ends the forward pass there and leaves no hook behind."""
    images = tiny_reference["input.images"][0]
    num_layers = len(tiny_model.aggregator.global_blocks)
    seen = []
    capture_global_layers(tiny_model, images, lambda layer: seen.append(layer.maps.clone()))
    assert len(seen) == num_layers and not torch.equal(seen[0], seen[1])

    def consume(layer) -> None:
        calls.append(layer.ref.block_index)
        if len(calls) == 2:
            raise RuntimeError("consumer failed")

    calls = []
    with pytest.raises(RuntimeError, match="consumer failed"):
        capture_global_layers(tiny_model, images, consume)
    assert calls == [0, 1]  # nothing captured after the failure
    assert all(not module._forward_hooks for module in tiny_model.modules())
