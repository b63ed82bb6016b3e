"""DINOv2 vision transformer with register tokens, used by VGGT as its patch embedding."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PatchEmbedConfig
from .layers import Block, PatchEmbed


class DinoVisionTransformer(nn.Module):
    """ViT with a class token, register tokens and a learned positional embedding that is
    resized (bicubic, optionally antialiased) to the input's patch grid.

    Token order inside each image: ``[cls, register_1..register_R, patches row-major]``.
    """

    def __init__(self, config: PatchEmbedConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.num_register_tokens = config.num_register_tokens
        dim = config.embed_dim
        grid = config.img_size // config.patch_size

        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
            if config.num_register_tokens
            else None
        )
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(
                dim, config.num_heads, config.mlp_ratio, init_values=config.init_values, norm_layer=norm_layer
            )
            for _ in range(config.depth)
        )
        self.norm = norm_layer(dim)
        self.head = nn.Identity()
        # Unused at inference; kept so that checkpoint names match upstream's.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> Tensor:
        """Positional embedding for a ``grid_h x grid_w`` patch grid: ``[1, 1 + grid_h*grid_w, dim]``."""
        num_stored = self.pos_embed.shape[1] - 1
        side = int(math.sqrt(num_stored))
        if grid_h * grid_w == num_stored and grid_h == grid_w:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        offset = self.config.interpolate_offset
        if offset:
            scale = ((grid_h + offset) / side, (grid_w + offset) / side)
            patch_pos = F.interpolate(
                patch_pos, scale_factor=scale, mode="bicubic", antialias=self.config.interpolate_antialias
            )
        else:
            patch_pos = F.interpolate(
                patch_pos, size=(grid_h, grid_w), mode="bicubic", antialias=self.config.interpolate_antialias
            )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat((cls_pos, patch_pos), dim=1).to(dtype)

    def prepare_tokens(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, 1 + R + (H/p)*(W/p), dim]``."""
        batch, _, height, width = images.shape
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(batch, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(height // self.patch_size, width // self.patch_size, x.dtype)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(batch, -1, -1), x[:, 1:]), dim=1)
        return x

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Run the ViT; returns normalized class, register and patch tokens and the pre-norm tokens."""
        return self.run_blocks(self.prepare_tokens(images))

    def run_blocks(self, x: Tensor, first_block: int = 0) -> dict[str, Tensor]:
        """Run blocks ``first_block..`` on ``x`` ``[B, 1 + R + patches, dim]``, the tokens entering
        block ``first_block``; returns what :meth:`forward` returns."""
        for block in self.blocks[first_block:]:
            x = block(x)
        x_norm = self.norm(x)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:first_patch],
            "x_norm_patchtokens": x_norm[:, first_patch:],
            "x_prenorm": x,
        }
