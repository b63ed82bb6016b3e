"""VGGT: the aggregator and its camera, depth, point and track heads, under upstream's names."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from .aggregator import Aggregator
from .config import HEAD_NAMES, AggregatorConfig, VGGTConfig
from .heads import CameraHead, DPTHead, TrackHead


class VGGT(nn.Module):
    """Visual Geometry Grounded Transformer.

    ``VGGT()`` builds ``facebook/VGGT-1B`` with all four heads; parameter names and shapes equal
    upstream's, so its checkpoints load as they are (:meth:`from_pretrained`, :mod:`vggt.weights`).
    A disabled head is not built (its attribute is ``None``) and its weights are never read.

    Parameters
    ----------
    img_size, patch_size, embed_dim : int, optional
        Upstream's arguments: VGGT-1B's architecture at these sizes (518, 14, 1024 when not given).
        Leave them out when ``config`` is given (or give the config's values).
    enable_camera, enable_point, enable_depth, enable_track : bool
        Which heads to build.
    config : VGGTConfig or AggregatorConfig, optional
        Every size of the model. An :class:`AggregatorConfig` gets VGGT-1B's heads fitted to it
        (:meth:`VGGTConfig.for_aggregator`).
    """

    def __init__(
        self,
        img_size: int | None = None,
        patch_size: int | None = None,
        embed_dim: int | None = None,
        enable_camera: bool = True,
        enable_point: bool = True,
        enable_depth: bool = True,
        enable_track: bool = True,
        *,
        config: VGGTConfig | AggregatorConfig | None = None,
    ) -> None:
        super().__init__()
        sizes = {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim}
        if config is None:
            config = VGGTConfig.vggt_1b(**{k: v for k, v in sizes.items() if v is not None})
        elif isinstance(config, AggregatorConfig):
            config = VGGTConfig.for_aggregator(config)
        conflicts = [
            f"{k}={v} (config: {getattr(config, k)})"
            for k, v in sizes.items()
            if v not in (None, getattr(config, k))
        ]
        if conflicts:
            raise ValueError(f"VGGT arguments contradict its config: {', '.join(conflicts)}")
        self.config = config

        self.aggregator = Aggregator(config.aggregator)
        enabled = {"camera_head": enable_camera, "depth_head": enable_depth, "point_head": enable_point,
                   "track_head": enable_track}  # fmt: skip
        for name in HEAD_NAMES:
            if enabled[name]:
                _check_layers(name, getattr(config, name), config.aggregator.depth)
        self.camera_head = CameraHead(**asdict(config.camera_head)) if enable_camera else None
        self.point_head = DPTHead(**asdict(config.point_head)) if enable_point else None
        self.depth_head = DPTHead(**asdict(config.depth_head)) if enable_depth else None
        self.track_head = TrackHead(**asdict(config.track_head)) if enable_track else None

    @classmethod
    def from_config(cls, config: VGGTConfig | AggregatorConfig, heads: bool = True) -> VGGT:
        """The model of ``config``, with all four heads or (``heads=False``) the aggregator alone."""
        flags = dict.fromkeys(("enable_camera", "enable_point", "enable_depth", "enable_track"), heads)
        return cls(config=config, **flags)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path = "facebook/VGGT-1B",
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        config: VGGTConfig | AggregatorConfig | None = None,
        device: str | torch.device = "cpu",
        **enable_heads: bool,
    ) -> VGGT:
        """Build VGGT and load its weights from the Hugging Face Hub or a local checkpoint.

        The weights are read straight into place (the model is first built without memory), strictly:
        every tensor of every built part must be in the checkpoint with its shape.

        Parameters
        ----------
        pretrained_model_name_or_path : str or Path
            A hub repository id (default ``facebook/VGGT-1B``), or a local ``.safetensors`` / ``.pt``
            file or a folder holding ``model.safetensors`` or ``model.pt``.
        revision, cache_dir
            Hub branch, tag or commit, and cache folder (``HF_HUB_CACHE`` / ``HF_HOME`` by default).
        local_files_only : bool
            Use the hub cache only, never the network (also the case with ``HF_HUB_OFFLINE=1``).
        config : VGGTConfig, optional
            The architecture, VGGT-1B's by default.
        device : str or torch.device
        **enable_heads
            ``enable_camera``, ``enable_point``, ``enable_depth``, ``enable_track`` (all ``True`` by
            default): a disabled head is neither built nor read.

        Returns
        -------
        VGGT
            In eval mode, gradients off, on ``device``; ``weights_source`` says where the weights came
            from.

        Raises
        ------
        vggt.weights.WeightsError
            When the checkpoint cannot be found or does not fit the model (a message for the user).
        """
        from vggt.weights import assign_weights, is_local_checkpoint

        unknown = set(enable_heads) - {"enable_camera", "enable_point", "enable_depth", "enable_track"}
        if unknown:
            raise TypeError(f"unexpected argument(s): {', '.join(sorted(unknown))}")
        local = is_local_checkpoint(pretrained_model_name_or_path)
        with torch.device("meta"):
            model = cls(config=config, **enable_heads)
        assign_weights(
            model,
            model_id=str(pretrained_model_name_or_path),
            revision=revision,
            checkpoint=pretrained_model_name_or_path if local else None,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            device=device,
        )
        return model

    def forward(self, images: Tensor, query_points: Tensor | None = None) -> dict[str, Tensor | list[Tensor]]:
        """Run the aggregator once and every built head on its outputs.

        Parameters
        ----------
        images : Tensor
            ``[S, 3, H, W]`` or ``[B, S, 3, H, W]`` in [0, 1]; H and W multiples of the patch size.
        query_points : Tensor, optional
            ``[N, 2]`` or ``[B, N, 2]`` pixel ``(x, y)`` in frame 0 to track (track head only).

        Returns
        -------
        dict
            ``pose_enc`` ``[B, S, 9]`` (last refinement) and ``pose_enc_list`` (every refinement);
            ``depth`` ``[B, S, H, W, 1]``, ``depth_conf`` ``[B, S, H, W]``; ``world_points``
            ``[B, S, H, W, 3]``, ``world_points_conf`` ``[B, S, H, W]``; with query points ``track``
            ``[B, S, N, 2]`` (pixels, last iteration), ``vis`` and ``conf`` ``[B, S, N]``; in eval mode
            ``images``, the input (with its batch axis). Entries of heads not built are absent.
        """
        if images.dim() == 4:
            images = images.unsqueeze(0)
        tokens, patch_start_idx = self.aggregator(images, keep_outputs=self.head_layers())
        return self.run_heads(tokens, images, patch_start_idx, query_points)

    def head_layers(self) -> tuple[int, ...]:
        """The aggregator block pairs whose outputs the built heads read (the last one always): pass
        them as ``keep_outputs`` to keep only those."""
        layers = {self.aggregator.depth - 1}
        for head in (self.depth_head, self.point_head, self.track_head):
            if head is not None:
                layers.update(getattr(head, "feature_extractor", head).intermediate_layer_idx)
        return tuple(sorted(layers))

    def run_heads(
        self,
        aggregated_tokens_list: list[Tensor | None],
        images: Tensor,
        patch_start_idx: int,
        query_points: Tensor | None = None,
    ) -> dict[str, Tensor | list[Tensor]]:
        """The heads' part of :meth:`forward`, on the outputs of an aggregator pass already made.

        ``aggregated_tokens_list`` holds one entry per block pair, at least those of
        :meth:`head_layers` (``keep_outputs=True``, or ``keep_outputs=self.head_layers()`` with ``None``
        for the others), and ``images`` is ``[B, S, 3, H, W]``. Under CUDA autocast the camera, depth and
        point heads run in float32 and the track head in the autocast dtype, as upstream's; likewise
        under CPU autocast.
        """
        if query_points is not None and query_points.dim() == 2:
            query_points = query_points.unsqueeze(0)
        if len(aggregated_tokens_list) != self.aggregator.depth:
            raise ValueError(
                f"the heads need all {self.aggregator.depth} block outputs of the aggregator, got "
                f"{len(aggregated_tokens_list)} (run it with keep_outputs=True)"
            )
        tokens = aggregated_tokens_list
        predictions: dict[str, Tensor | list[Tensor]] = {}
        with torch.autocast(device_type=images.device.type, enabled=False):
            if self.camera_head is not None:
                pose_enc_list = self.camera_head(tokens)
                predictions["pose_enc"] = pose_enc_list[-1]
                predictions["pose_enc_list"] = pose_enc_list
            if self.depth_head is not None:
                depth, depth_conf = self.depth_head(tokens, images, patch_start_idx)
                predictions["depth"], predictions["depth_conf"] = depth, depth_conf
            if self.point_head is not None:
                points, points_conf = self.point_head(tokens, images, patch_start_idx)
                predictions["world_points"], predictions["world_points_conf"] = points, points_conf
        if self.track_head is not None and query_points is not None:
            track_list, vis, conf = self.track_head(
                tokens, images, patch_start_idx, query_points=query_points
            )
            predictions["track"], predictions["vis"], predictions["conf"] = track_list[-1], vis, conf
        if not self.training:
            predictions["images"] = images
        return predictions


def _check_layers(name: str, head_config, depth: int) -> None:
    layers = getattr(head_config, "intermediate_layer_idx", ())
    if any(not 0 <= i < depth for i in layers):
        raise ValueError(
            f"{name} reads aggregator layers {tuple(layers)}, but the aggregator has {depth}: give the "
            f"head its own intermediate_layer_idx in the config (VGGTConfig.{name})"
        )
