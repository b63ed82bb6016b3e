"""Track head: dense features from the aggregator's tokens, then the iterative tracker."""

from __future__ import annotations

from torch import Tensor, nn

from .dpt import DPTHead
from .tracker import Tracker


class TrackHead(nn.Module):
    """Track points of frame 0 through every frame.

    A feature-only DPT head turns the tokens into ``features``-channel maps at ``1 / down_ratio`` of the
    image resolution; :class:`~vggt.models.heads.tracker.Tracker` follows the query points through them.
    ``out_channels`` and ``intermediate_layer_idx`` size the feature extractor; the tracker's own sizes
    are ``stride``, ``corr_levels``, ``corr_radius``, ``hidden_size`` and the ``tracker_*`` arguments.
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        features: int = 128,
        iters: int = 4,
        predict_conf: bool = True,
        stride: int = 2,
        corr_levels: int = 7,
        corr_radius: int = 4,
        hidden_size: int = 384,
        out_channels: tuple[int, ...] = (256, 512, 1024, 1024),
        intermediate_layer_idx: tuple[int, ...] = (4, 11, 17, 23),
        down_ratio: int = 2,
        tracker_depth: int = 6,
        tracker_num_heads: int = 8,
        num_virtual_tracks: int = 64,
        max_scale: int = 518,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.iters = iters
        self.feature_extractor = DPTHead(
            dim_in,
            patch_size=patch_size,
            features=features,
            out_channels=out_channels,
            intermediate_layer_idx=intermediate_layer_idx,
            pos_embed=False,
            feature_only=True,
            down_ratio=down_ratio,
        )
        self.tracker = Tracker(
            stride=stride,
            corr_levels=corr_levels,
            corr_radius=corr_radius,
            latent_dim=features,
            hidden_size=hidden_size,
            depth=tracker_depth,
            num_heads=tracker_num_heads,
            num_virtual_tracks=num_virtual_tracks,
            max_scale=max_scale,
            predict_conf=predict_conf,
        )

    def forward(
        self,
        aggregated_tokens_list: list[Tensor],
        images: Tensor,
        patch_start_idx: int,
        query_points: Tensor,
        iters: int | None = None,
    ) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """Tracks of ``query_points`` ``[B, N, 2]`` (pixel x, y in frame 0) through ``images``
        ``[B, S, 3, H, W]``: positions ``[B, S, N, 2]`` after each iteration, visibility and confidence
        ``[B, S, N]``. See :meth:`Tracker.forward`."""
        feature_maps = self.feature_extractor(aggregated_tokens_list, images, patch_start_idx)
        return self.tracker(query_points, feature_maps, iters=self.iters if iters is None else iters)
