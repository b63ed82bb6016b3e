"""The iterative point tracker of VGGT's track head (after CoTracker and VGGSfM).

Query points of frame 0 start at the same position in every frame. Each iteration correlates the
tracks' features with a pyramid of feature maps around the current positions, and the update
transformer predicts corrections of the positions and of the track features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import Mlp
from .positional import flow_embedding, pixel_grid_embedding
from .update_former import EfficientUpdateFormer


def sample_at_pixels(maps: Tensor, coords: Tensor, padding_mode: str) -> Tensor:
    """Bilinear samples of ``maps`` ``[N, C, H, W]`` at pixel ``(x, y)`` ``coords`` ``[N, h, w, 2]``
    (pixel centres at integers) -> ``[N, C, h, w]``."""
    height, width = maps.shape[-2:]
    scale = torch.tensor(
        [2 / max(width - 1, 1), 2 / max(height - 1, 1)], device=maps.device, dtype=maps.dtype
    )
    grid = coords.to(maps.device, maps.dtype) * scale - 1
    return F.grid_sample(maps, grid, align_corners=True, padding_mode=padding_mode)


def sample_features(maps: Tensor, coords: Tensor) -> Tensor:
    """Features of ``maps`` ``[B, C, H, W]`` at points ``[B, R, 2]`` -> ``[B, R, C]`` (border padding)."""
    sampled = sample_at_pixels(maps, coords[:, :, None], padding_mode="border")  # [B, C, R, 1]
    return sampled[..., 0].permute(0, 2, 1)


class CorrelationPyramid:
    """Feature maps ``[B, S, C, H, W]`` at ``num_levels`` resolutions (halved by average pooling).

    :meth:`sample` correlates track features with each level and reads the correlation in a
    ``(2r + 1)^2`` window around each track's position; the full correlation volume of a level exists
    only while it is sampled.
    """

    def __init__(self, fmaps: Tensor, num_levels: int, radius: int) -> None:
        self.radius = radius
        self.levels = [fmaps]
        for _ in range(num_levels - 1):
            batch, frames, channels, height, width = self.levels[-1].shape
            pooled = F.avg_pool2d(
                self.levels[-1].reshape(batch * frames, channels, height, width), 2, stride=2
            )
            self.levels.append(pooled.reshape(batch, frames, channels, *pooled.shape[-2:]))
        offsets = torch.linspace(-radius, radius, 2 * radius + 1, device=fmaps.device, dtype=fmaps.dtype)
        # window[a, b] = (offsets[a], offsets[b]) added to (x, y): the first window axis moves along x.
        self.window = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)

    def sample(self, targets: Tensor, coords: Tensor) -> Tensor:
        """``targets`` ``[B, S, N, C]``, ``coords`` ``[B, S, N, 2]`` (level-0 pixels) ->
        ``[B, S, N, num_levels * (2r + 1)^2]``."""
        batch, frames, num_points, _ = targets.shape
        side = 2 * self.radius + 1
        window = self.window.to(coords.device, coords.dtype).view(1, side, side, 2)
        sampled = []
        for level, fmaps in enumerate(self.levels):
            _, _, channels, height, width = fmaps.shape
            corr = torch.matmul(targets, fmaps.view(batch, frames, channels, height * width)) / math.sqrt(
                channels
            )
            grid = coords.reshape(batch * frames * num_points, 1, 1, 2) / 2**level + window
            corr = sample_at_pixels(corr.reshape(-1, 1, height, width), grid, padding_mode="zeros")
            sampled.append(corr.view(batch, frames, num_points, -1))
        return torch.cat(sampled, dim=-1)


class Tracker(nn.Module):
    """Track query points through feature maps (upstream's ``BaseTrackerPredictor``).

    Parameters
    ----------
    stride : int
        Image pixels per feature-map pixel.
    corr_levels, corr_radius : int
        Levels of the correlation pyramid and radius of the window read at each.
    latent_dim : int
        Channels of the feature maps and track features.
    hidden_size : int
        Width of the update transformer.
    depth, num_heads, num_virtual_tracks : int
        Update transformer: time blocks (and as many space blocks), heads, virtual tracks.
    max_scale : int
        Displacements are also fed divided by this.
    predict_conf : bool
        Also predict a confidence per point and frame.
    """

    def __init__(
        self,
        stride: int = 1,
        corr_levels: int = 5,
        corr_radius: int = 4,
        latent_dim: int = 128,
        hidden_size: int = 384,
        depth: int = 6,
        num_heads: int = 8,
        num_virtual_tracks: int = 64,
        max_scale: int = 518,
        predict_conf: bool = True,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.latent_dim = latent_dim
        self.corr_levels = corr_levels
        self.corr_radius = corr_radius
        self.max_scale = max_scale
        self.predict_conf = predict_conf
        self.transformer_dim = 3 * latent_dim + 4  # flow embedding (+4 raw), correlation, track features

        self.corr_mlp = Mlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden_size, out_dim=latent_dim)
        # Added to the tokens of the query frame (first entry) and of every other frame (second).
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, self.transformer_dim))
        self.updateformer = EfficientUpdateFormer(
            space_depth=depth,
            time_depth=depth,
            input_dim=self.transformer_dim,
            hidden_size=hidden_size,
            num_heads=num_heads,
            output_dim=latent_dim + 2,
            num_virtual_tracks=num_virtual_tracks,
        )
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        if predict_conf:
            self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1))

    def forward(
        self, query_points: Tensor, fmaps: Tensor, iters: int = 6
    ) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """Track ``query_points`` ``[B, N, 2]`` (pixels of frame 0) through ``fmaps`` ``[B, S, C, h, w]``.

        Returns
        -------
        coord_preds : list[Tensor]
            Positions ``[B, S, N, 2]`` in image pixels after each iteration (frame 0 stays the query).
        vis : Tensor
            Visibility ``[B, S, N]`` in (0, 1).
        conf : Tensor or None
            Confidence ``[B, S, N]`` in (0, 1) when ``predict_conf``.
        """
        batch, num_points, _ = query_points.shape
        _, frames, channels, height, width = fmaps.shape
        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)

        queries = query_points / float(self.stride)
        coords = queries[:, None].repeat(1, frames, 1, 1)
        track_feats = sample_features(fmaps[:, 0], queries)[:, None].repeat(1, frames, 1, 1)  # [B, S, N, C]
        pyramid = CorrelationPyramid(fmaps, self.corr_levels, self.corr_radius)

        pos_embed = pixel_grid_embedding(self.transformer_dim, height, width, device=query_points.device)
        query_pos = sample_features(pos_embed.expand(batch, -1, -1, -1), queries)
        query_pos = query_pos.reshape(batch * num_points, 1, -1)
        frame_tokens = torch.cat(
            [self.query_ref_token[:, :1], self.query_ref_token[:, 1:].expand(-1, frames - 1, -1)], dim=1
        )

        coord_preds = []
        for _ in range(iters):
            coords = coords.detach()
            corr = pyramid.sample(track_feats, coords)
            corr = self.corr_mlp(corr.permute(0, 2, 1, 3).reshape(batch * num_points, frames, -1))
            flows = (coords - coords[:, :1]).permute(0, 2, 1, 3).reshape(batch * num_points, frames, 2)
            flow_emb = torch.cat(
                [flow_embedding(flows, self.latent_dim // 2), flows / self.max_scale, flows / self.max_scale],
                dim=-1,
            )
            feats = track_feats.permute(0, 2, 1, 3).reshape(batch * num_points, frames, self.latent_dim)
            x = torch.cat([flow_emb, corr, feats], dim=-1) + query_pos
            x = x + frame_tokens.to(x.device, x.dtype)

            delta = self.updateformer(x.view(batch, num_points, frames, -1))
            delta_coords = delta[..., :2]
            delta_feats = delta[..., 2:].reshape(-1, self.latent_dim)
            feats = self.ffeat_updater(self.ffeat_norm(delta_feats)) + feats.reshape(-1, self.latent_dim)
            track_feats = feats.view(batch, num_points, frames, self.latent_dim).permute(0, 2, 1, 3)
            coords = coords + delta_coords.permute(0, 2, 1, 3)
            coords[:, 0] = queries  # the query frame's positions are given, not predicted
            coord_preds.append(coords * self.stride)

        flat_feats = track_feats.reshape(batch * frames * num_points, self.latent_dim)
        vis = torch.sigmoid(self.vis_predictor(flat_feats).view(batch, frames, num_points))
        conf = None
        if self.predict_conf:
            conf = torch.sigmoid(self.conf_predictor(flat_feats).view(batch, frames, num_points))
        return coord_preds, vis, conf
