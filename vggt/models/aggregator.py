"""VGGT's aggregator: DINOv2 patch tokens, then alternating frame and global attention."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn

from .config import AggregatorConfig
from .dinov2 import DinoVisionTransformer
from .layers import Block
from .rope import RotaryPositionEmbedding2D, patch_positions

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def expand_frame_tokens(tokens: Tensor, batch: int, frames: int) -> Tensor:
    """Give frame 0 the first learned set and every other frame the second.

    ``tokens`` ``[1, 2, X, C]`` -> ``[batch * frames, X, C]``.
    """
    first = tokens[:, :1].expand(batch, 1, *tokens.shape[2:])
    others = tokens[:, 1:].expand(batch, frames - 1, *tokens.shape[2:])
    return torch.cat((first, others), dim=1).reshape(batch * frames, *tokens.shape[2:])


class Aggregator(nn.Module):
    """Alternating-attention transformer over the tokens of every frame.

    Each frame carries ``[camera, register_1..register_R, patches row-major]``. Block ``i`` of
    ``frame_blocks`` attends within each frame, then block ``i`` of ``global_blocks`` attends over
    the tokens of all frames at once (frame by frame order).
    """

    def __init__(self, config: AggregatorConfig | None = None) -> None:
        super().__init__()
        config = config or AggregatorConfig()
        self.config = config
        self.patch_size = config.patch_size
        self.depth = config.depth
        self.patch_start_idx = config.patch_start_idx
        dim = config.embed_dim

        self.patch_embed = DinoVisionTransformer(config.patch_embed)
        self.rope = RotaryPositionEmbedding2D(config.rope_freq) if config.rope_freq > 0 else None

        def make_block() -> Block:
            return Block(
                dim,
                config.num_heads,
                config.mlp_ratio,
                init_values=config.init_values,
                qk_norm=config.qk_norm,
                rope=self.rope,
            )

        self.frame_blocks = nn.ModuleList(make_block() for _ in range(config.depth))
        self.global_blocks = nn.ModuleList(make_block() for _ in range(config.depth))
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, config.num_register_tokens, dim))
        # Constants, not weights: always real CPU tensors, also when the model is built on "meta" to
        # have its weights assigned from a checkpoint.
        self.register_buffer(
            "_resnet_mean", torch.tensor(IMAGENET_MEAN, device="cpu").view(1, 1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "_resnet_std", torch.tensor(IMAGENET_STD, device="cpu").view(1, 1, 3, 1, 1), persistent=False
        )

    def embed(
        self, images: Tensor, dino_tokens: Tensor | None = None, dino_first_block: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Initial tokens and positions of every frame.

        Parameters
        ----------
        images : Tensor
            ``[B, S, 3, H, W]`` in [0, 1]; H and W multiples of the patch size.
        dino_tokens : Tensor, optional
            ``[B*S, 1 + R + patches, C]``: the tokens entering DINOv2 block ``dino_first_block``, from
            an earlier run on the same images; the DINOv2 blocks before it are then not run again.
        dino_first_block : int

        Returns
        -------
        tokens : Tensor
            ``[B*S, P, C]`` with ``P = patch_start_idx + (H/p)*(W/p)``.
        pos : Tensor | None
            ``[B*S, P, 2]`` RoPE positions: 0 for special tokens, ``1 + (row, col)`` for patches.
        """
        batch, frames, channels, height, width = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {width} x {height} (W x H) is not a multiple of the patch size {self.patch_size}"
            )
        if dino_tokens is None:
            images = (images - self._resnet_mean) / self._resnet_std
            dino_out = self.patch_embed(images.view(batch * frames, channels, height, width))
        else:
            dino_out = self.patch_embed.run_blocks(dino_tokens, dino_first_block)
        patch_tokens = dino_out["x_norm_patchtokens"]
        camera = expand_frame_tokens(self.camera_token, batch, frames)
        registers = expand_frame_tokens(self.register_token, batch, frames)
        tokens = torch.cat((camera, registers, patch_tokens), dim=1)
        return tokens, self.token_positions(images)

    def token_positions(self, images: Tensor) -> Tensor | None:
        """RoPE positions of every frame's tokens, ``[B*S, P, 2]`` (``None`` without RoPE): 0 for the
        special tokens, ``1 + (row, col)`` for the patches."""
        if self.rope is None:
            return None
        batch, frames, _, height, width = images.shape
        pos = patch_positions(
            batch * frames, height // self.patch_size, width // self.patch_size, images.device
        )
        pos = pos + 1
        special = torch.zeros(batch * frames, self.patch_start_idx, 2, dtype=pos.dtype, device=pos.device)
        return torch.cat((special, pos), dim=1)

    def forward(
        self, images: Tensor, keep_outputs: bool | Collection[int] = True
    ) -> tuple[list[Tensor | None], int]:
        """Run all blocks.

        Parameters
        ----------
        images : Tensor
            ``[B, S, 3, H, W]`` in [0, 1].
        keep_outputs : bool or collection of int
            When False, per-block outputs are not kept (the list holds only the last one): for
            callers that only read activations through hook points. A collection of block indices
            keeps those and the last; the list then has one entry per block pair, ``None`` for the
            others (what the heads need: they index the list by block).

        Returns
        -------
        outputs : list[Tensor | None]
            One ``[B, S, P, 2C]`` tensor per block pair: frame-block output and global-block output
            concatenated on the last axis.
        patch_start_idx : int
            Index of the first patch token within each frame.
        """
        batch, frames = images.shape[:2]
        tokens, pos = self.embed(images)
        outputs = self.run_blocks(tokens.unflatten(0, (batch, frames)), pos, keep_outputs=keep_outputs)
        return outputs, self.patch_start_idx

    def run_blocks(
        self,
        tokens: Tensor,
        pos: Tensor | None,
        first_block: int = 0,
        from_global: bool = False,
        keep_outputs: bool | Collection[int] = True,
    ) -> list[Tensor | None]:
        """Run the block pairs ``first_block..depth-1`` from given tokens.

        Parameters
        ----------
        tokens : Tensor
            ``[B, S, P, C]``: the tokens entering frame block ``first_block``, or with ``from_global``
            its global block (they are then that pair's frame-block output).
        pos : Tensor | None
            ``[B*S, P, 2]`` per-frame RoPE positions, as :meth:`embed` returns them.
        first_block : int
        from_global : bool
        keep_outputs : bool or collection of int
            As in :meth:`forward`.

        Returns
        -------
        list[Tensor | None]
            The outputs of block pairs ``first_block..`` (``[B, S, P, 2C]`` each), or only the last, or
            those kept (``None`` for the others).
        """
        batch, frames, tokens_per_frame, dim = tokens.shape
        frame_pos = pos
        global_pos = None if pos is None else pos.reshape(batch, frames * tokens_per_frame, 2)
        outputs: list[Tensor] = []
        for index in range(first_block, self.depth):
            if not (from_global and index == first_block):
                tokens = self.frame_blocks[index](
                    tokens.reshape(batch * frames, tokens_per_frame, dim), pos=frame_pos
                )
            frame_out = tokens.reshape(batch, frames, tokens_per_frame, dim)
            tokens = self.global_blocks[index](
                tokens.reshape(batch, frames * tokens_per_frame, dim), pos=global_pos
            )
            global_out = tokens.view(batch, frames, tokens_per_frame, dim)
            if (
                keep_outputs is True
                or index == self.depth - 1
                or (keep_outputs is not False and index in keep_outputs)
            ):
                outputs.append(torch.cat((frame_out, global_out), dim=-1))
            elif keep_outputs is not False:
                outputs.append(None)
        return outputs
