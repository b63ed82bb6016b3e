"""DPT head (Ranftl et al., "Vision Transformers for Dense Prediction") over VGGT's tokens.

Four intermediate aggregator outputs are projected to feature maps at 4x, 2x, 1x and 1/2x the patch
grid, fused coarse to fine by residual refinement blocks, and upsampled to the image (or to
``1 / down_ratio`` of it). VGGT's depth and point heads end in a small convolutional output layer and
an activation; the track head uses the fused features themselves (``feature_only``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import activate_head
from .positional import embed_position_grid, uv_grid

# Bilinear upsampling of more elements than this is done in batch chunks: very large outputs overflow
# the 32-bit indexing of some CUDA kernels.
MAX_INTERPOLATE_ELEMENTS = 1_610_612_736


def interpolate_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=True)``, in chunks when very large."""
    elements = size[0] * size[1] * x.shape[0] * x.shape[1]
    if elements <= MAX_INTERPOLATE_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    chunks = x.chunk(elements // MAX_INTERPOLATE_ELEMENTS + 1, dim=0)
    return torch.cat([F.interpolate(c, size=size, mode="bilinear", align_corners=True) for c in chunks])


class ResidualConvUnit(nn.Module):
    """``relu(x) + conv2(relu(conv1(relu(x))))``.

    Upstream applies an in-place ReLU to the input, so its skip connection carries ``relu(x)``, not
    ``x``; written out here.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        return x + self.conv2(F.relu(self.conv1(x)))


class FeatureFusionBlock(nn.Module):
    """Add the skip features (refined), refine, upsample (to ``size``, or 2x), then a 1x1 convolution."""

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        self.has_residual = has_residual
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = interpolate_bilinear(x, size or (x.shape[-2] * 2, x.shape[-1] * 2))
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Dense prediction from 4 intermediate aggregator outputs.

    Parameters
    ----------
    dim_in : int
        Width of the aggregator's outputs (``2 * embed_dim``).
    patch_size : int
    output_dim : int
        Output channels before the activation, the confidence last (depth 2, points 4).
    activation, conf_activation : str
        See :mod:`vggt.models.heads.activations`.
    features : int
        Channels of the fused feature maps.
    out_channels : tuple of 4 ints
        Channels of each intermediate output's projection.
    intermediate_layer_idx : tuple of 4 ints
        Which aggregator outputs (block indices) are read, shallow to deep.
    pos_embed : bool
        Add a sine-cosine embedding of the image position to the projections and to the fused output.
    feature_only : bool
        Return the fused ``features``-channel maps instead of activated predictions.
    down_ratio : int
        Output resolution is the image's divided by this.
    """

    frames_chunk_size: int | None = 8
    """Frames processed at once by :meth:`forward` unless it is told otherwise: bounds the memory of
    the full-resolution maps. ``None`` processes all frames together."""

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: tuple[int, ...] = (256, 512, 1024, 1024),
        intermediate_layer_idx: tuple[int, ...] = (4, 11, 17, 23),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
    ) -> None:
        super().__init__()
        if len(out_channels) != 4 or len(intermediate_layer_idx) != 4:
            raise ValueError("a DPT head reads exactly 4 intermediate layers")
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self.intermediate_layer_idx = tuple(intermediate_layer_idx)

        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, channels, kernel_size=1) for channels in out_channels)
        # From the patch grid to 4x, 2x, 1x and 1/2x its resolution.
        c0, c1, _, c3 = out_channels
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c0, c0, kernel_size=4, stride=4),
                nn.ConvTranspose2d(c1, c1, kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(c3, c3, kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for i, channels in enumerate(out_channels, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(channels, features, 3, padding=1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        if feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(32, output_dim, kernel_size=1),
            )

    def forward(
        self,
        aggregated_tokens_list: list[Tensor],
        images: Tensor,
        patch_start_idx: int,
        frames_chunk_size: int | None = -1,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Dense predictions for every frame.

        Parameters
        ----------
        aggregated_tokens_list : list[Tensor]
            The aggregator's outputs, each ``[B, S, P, dim_in]``.
        images : Tensor
            ``[B, S, 3, H, W]``; only its shape is used.
        patch_start_idx : int
            Index of the first patch token in each frame.
        frames_chunk_size : int or None
            Frames per chunk; :attr:`frames_chunk_size` when not given, all at once when ``None``.

        Returns
        -------
        Tensor or tuple[Tensor, Tensor]
            ``feature_only``: features ``[B, S, features, H/r, W/r]``. Otherwise values
            ``[B, S, H, W, output_dim - 1]`` and confidence ``[B, S, H, W]``.
        """
        if frames_chunk_size == -1:
            frames_chunk_size = self.frames_chunk_size
        frames = images.shape[1]
        image_hw = images.shape[-2:]
        if frames_chunk_size is None or frames_chunk_size >= frames:
            return self._forward_frames(aggregated_tokens_list, image_hw, patch_start_idx, slice(None))
        if frames_chunk_size < 1:
            raise ValueError(f"frames_chunk_size must be positive, not {frames_chunk_size}")
        chunks = [
            self._forward_frames(
                aggregated_tokens_list, image_hw, patch_start_idx, slice(s, s + frames_chunk_size)
            )
            for s in range(0, frames, frames_chunk_size)
        ]
        if self.feature_only:
            return torch.cat(chunks, dim=1)
        values, confidence = zip(*chunks, strict=True)
        return torch.cat(values, dim=1), torch.cat(confidence, dim=1)

    def _forward_frames(
        self, tokens_list: list[Tensor], image_hw: tuple[int, int], patch_start_idx: int, frames: slice
    ) -> Tensor | tuple[Tensor, Tensor]:
        height, width = image_hw
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        maps = []
        for layer_idx, project, resize in zip(
            self.intermediate_layer_idx, self.projects, self.resize_layers, strict=True
        ):
            x = tokens_list[layer_idx][:, frames, patch_start_idx:]
            batch, num_frames = x.shape[:2]
            x = self.norm(x.reshape(batch * num_frames, -1, x.shape[-1]))
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], grid_h, grid_w)
            x = project(x)
            if self.pos_embed:
                x = self._add_pos_embed(x, width, height)
            maps.append(resize(x))

        out = self.fuse(maps)
        out_size = (
            int(grid_h * self.patch_size / self.down_ratio),
            int(grid_w * self.patch_size / self.down_ratio),
        )
        out = interpolate_bilinear(out, out_size)
        if self.pos_embed:
            out = self._add_pos_embed(out, width, height)
        if self.feature_only:
            return out.view(batch, num_frames, *out.shape[1:])
        values, confidence = activate_head(
            self.scratch.output_conv2(out), self.activation, self.conf_activation
        )
        return values.view(batch, num_frames, *values.shape[1:]), confidence.view(
            batch, num_frames, *confidence.shape[1:]
        )

    def fuse(self, maps: list[Tensor]) -> Tensor:
        """Fuse the 4 resized maps, coarsest first, at the finest map's resolution."""
        scratch = self.scratch
        layer1 = scratch.layer1_rn(maps[0])
        layer2 = scratch.layer2_rn(maps[1])
        layer3 = scratch.layer3_rn(maps[2])
        layer4 = scratch.layer4_rn(maps[3])
        out = scratch.refinenet4(layer4, size=layer3.shape[2:])
        out = scratch.refinenet3(out, layer3, size=layer2.shape[2:])
        out = scratch.refinenet2(out, layer2, size=layer1.shape[2:])
        out = scratch.refinenet1(out, layer1)
        return scratch.output_conv1(out)

    @staticmethod
    def _add_pos_embed(x: Tensor, width: int, height: int, ratio: float = 0.1) -> Tensor:
        """Add ``ratio`` times the embedding of each cell's position in the image (aspect-correct)."""
        grid = uv_grid(x.shape[-1], x.shape[-2], aspect_ratio=width / height, dtype=x.dtype, device=x.device)
        embedding = embed_position_grid(grid, x.shape[1]) * ratio
        return x + embedding.permute(2, 0, 1)[None].expand(x.shape[0], -1, -1, -1)
