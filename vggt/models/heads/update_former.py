"""The tracker's update transformer: attention along each track's frames and, through a small set of
learned virtual tracks, across tracks (as in CoTracker)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import Mlp


class AttnBlock(nn.Module):
    """Self-attention then MLP. The attention's residual starts from the normalized input (upstream's
    arrangement, unlike a pre-norm block)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """Cross-attention from ``x`` to ``context`` then MLP, arranged like :class:`AttnBlock`."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.cross_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.norm1(x)
        context = self.norm_context(context)
        x = x + self.cross_attn(x, context, context, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class EfficientUpdateFormer(nn.Module):
    """Map per-track, per-frame features ``[B, N, S, input_dim]`` to updates ``[B, N, S, output_dim]``.

    Each time block attends along the frames of every track; after it (every
    ``time_depth // space_depth`` blocks) the virtual tracks gather from the real ones, attend among
    themselves, and the real tracks read back from them: attention across tracks at a cost linear in
    the number of tracks.
    """

    def __init__(
        self,
        space_depth: int = 6,
        time_depth: int = 6,
        input_dim: int = 320,
        hidden_size: int = 384,
        num_heads: int = 8,
        output_dim: int = 130,
        mlp_ratio: float = 4.0,
        add_space_attn: bool = True,
        num_virtual_tracks: int = 64,
    ) -> None:
        super().__init__()
        if add_space_attn and not 0 < space_depth <= time_depth:
            raise ValueError("the update transformer needs 1 to time_depth space blocks")
        self.add_space_attn = add_space_attn
        self.num_virtual_tracks = num_virtual_tracks
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim)
        # (sic) upstream's parameter name
        self.virual_tracks = (
            nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size)) if add_space_attn else None
        )

        def blocks(depth: int, block: type[nn.Module]) -> nn.ModuleList:
            return nn.ModuleList(block(hidden_size, num_heads, mlp_ratio) for _ in range(depth))

        self.time_blocks = blocks(time_depth, AttnBlock)
        if add_space_attn:
            self.space_virtual_blocks = blocks(space_depth, AttnBlock)
            self.space_point2virtual_blocks = blocks(space_depth, CrossAttnBlock)
            self.space_virtual2point_blocks = blocks(space_depth, CrossAttnBlock)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.input_transform(self.input_norm(x))
        initial = tokens
        batch, num_points, frames, _ = tokens.shape
        if self.add_space_attn:
            virtual = self.virual_tracks.repeat(batch, 1, frames, 1)
            tokens = torch.cat([tokens, virtual], dim=1)
            space_every = len(self.time_blocks) // len(self.space_virtual_blocks)
        num_tracks = tokens.shape[1]

        space_idx = 0
        for i, time_block in enumerate(self.time_blocks):
            tokens = time_block(tokens.reshape(batch * num_tracks, frames, -1))
            tokens = tokens.view(batch, num_tracks, frames, -1)
            if self.add_space_attn and i % space_every == 0:
                space = tokens.permute(0, 2, 1, 3).reshape(batch * frames, num_tracks, -1)
                points, virtual = space[:, :num_points], space[:, num_points:]
                virtual = self.space_virtual2point_blocks[space_idx](virtual, points)
                virtual = self.space_virtual_blocks[space_idx](virtual)
                points = self.space_point2virtual_blocks[space_idx](points, virtual)
                space = torch.cat([points, virtual], dim=1)
                tokens = space.view(batch, frames, num_tracks, -1).permute(0, 2, 1, 3)
                space_idx += 1

        tokens = tokens[:, :num_points] + initial
        return self.flow_head(self.output_norm(tokens))
