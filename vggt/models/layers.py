"""Transformer building blocks shared by the DINOv2 patch embedding and the aggregator."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hooks import HookPoint, MaskHookPoint
from .rope import RotaryPositionEmbedding2D


class PatchEmbed(nn.Module):
    """Non-overlapping convolutional patchify: ``[B, 3, H, W]`` -> ``[B, (H/p)*(W/p), dim]``."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """Two-layer feed-forward network with GELU: ``dim -> hidden_dim -> out_dim`` (``dim`` by default)."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with optional LayerNorm on queries/keys and 2D RoPE.

    Hook points, in the order the forward pass reaches them:

    - ``hook_qk`` sees ``(q, k)``, each ``[B, heads, N, head_dim]``, after the normalization and the
      rotary embedding: exactly what enters the softmax (before the ``head_dim ** -0.5`` scale).
    - ``hook_attn_mask`` (a :class:`MaskHookPoint`) sees the same ``(q, k)`` and yields the attention
      mask: ``None`` unless a hook returns a boolean mask broadcastable to ``[B, heads, N, N]``
      (True: the query attends to the key).
    - ``hook_head_outputs`` sees ``(x,)``, the heads' outputs ``[B, heads, N, head_dim]`` before they
      are merged and projected; a hook may return a replacement ``(x,)``.

    With no hook attached the forward pass is one fused ``scaled_dot_product_attention`` call.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_norm: bool = False,
        rope: RotaryPositionEmbedding2D | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope
        self.hook_qk = HookPoint()
        self.hook_attn_mask = MaskHookPoint()
        self.hook_head_outputs = HookPoint()

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q = self.rope(q, pos)
            k = self.rope(k, pos)
        q, k = self.hook_qk(q, k)
        mask = self.hook_attn_mask(q, k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        (x,) = self.hook_head_outputs(x)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: attention and MLP residual branches, each with LayerScale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        init_values: float | None = None,
        qk_norm: bool = False,
        rope: RotaryPositionEmbedding2D | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))
