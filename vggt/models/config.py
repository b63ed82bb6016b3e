"""Architecture configuration of VGGT: the aggregator and the camera, depth, point and track heads.

Every size of the model comes from here, so that any VGGT (VGGT-1B, or the tiny models the tests use)
is built from one :class:`VGGTConfig`. Field names are upstream's constructor arguments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace


@dataclass(frozen=True)
class PatchEmbedConfig:
    """DINOv2 ViT with register tokens that turns each frame into patch tokens."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0
    init_values: float = 1.0


@dataclass(frozen=True)
class AggregatorConfig:
    """Alternating frame/global attention transformer on top of the patch embedding."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qk_norm: bool = True
    rope_freq: float = 100.0
    init_values: float = 0.01
    patch_embed: PatchEmbedConfig = field(default_factory=PatchEmbedConfig)

    @property
    def patch_start_idx(self) -> int:
        """Index of the first patch token in each frame: camera token + registers come first."""
        return 1 + self.num_register_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AggregatorConfig:
        data = dict(data)
        patch_embed = PatchEmbedConfig(**data.pop("patch_embed", {}))
        return cls(patch_embed=patch_embed, **data)

    @classmethod
    def vggt_1b(cls) -> AggregatorConfig:
        """The architecture of ``facebook/VGGT-1B``."""
        return cls()

    @classmethod
    def from_reference_json(cls, reference: dict) -> AggregatorConfig:
        """Build from the layout of upstream's reference JSON (``aggregator`` and ``patch_embed_dinov2``
        or ``patch_embed``)."""
        agg = reference["aggregator"]
        dino = reference.get("patch_embed_dinov2") or reference["patch_embed"]
        patch_embed = PatchEmbedConfig(
            img_size=dino["img_size"],
            patch_size=dino["patch_size"],
            embed_dim=dino["embed_dim"],
            depth=dino["depth"],
            num_heads=dino["num_heads"],
            mlp_ratio=float(dino["mlp_ratio"]),
            num_register_tokens=dino["num_register_tokens"],
            interpolate_antialias=dino["interpolate_antialias"],
            interpolate_offset=dino["interpolate_offset"],
            init_values=dino["init_values"],
        )
        return cls(
            img_size=agg["img_size"],
            patch_size=agg["patch_size"],
            embed_dim=agg["embed_dim"],
            depth=agg["depth"],
            num_heads=agg["num_heads"],
            mlp_ratio=float(agg["mlp_ratio"]),
            num_register_tokens=agg["num_register_tokens"],
            qk_norm=agg["qk_norm"],
            rope_freq=float(agg["rope_freq"]),
            init_values=agg["init_values"],
            patch_embed=patch_embed,
        )


def _with_tuples(cls, data: dict):
    """``cls(**data)`` with JSON lists turned back into the tuples a frozen config holds."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class CameraHeadConfig:
    """Camera head: a trunk of transformer blocks over the camera tokens, refined iteratively."""

    dim_in: int = 2048
    trunk_depth: int = 4
    pose_encoding_type: str = "absT_quaR_FoV"
    num_heads: int = 16
    mlp_ratio: float = 4.0
    init_values: float = 0.01
    trans_act: str = "linear"
    quat_act: str = "linear"
    fl_act: str = "relu"


@dataclass(frozen=True)
class DPTHeadConfig:
    """DPT head: fuses 4 intermediate aggregator outputs into a dense map (depth, points or features)."""

    dim_in: int = 2048
    patch_size: int = 14
    output_dim: int = 4
    activation: str = "inv_log"
    conf_activation: str = "expp1"
    features: int = 256
    out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    intermediate_layer_idx: tuple[int, int, int, int] = (4, 11, 17, 23)
    pos_embed: bool = True
    feature_only: bool = False
    down_ratio: int = 1


@dataclass(frozen=True)
class TrackHeadConfig:
    """Track head: a DPT feature extractor at ``1 / down_ratio`` resolution and the iterative tracker.

    ``out_channels`` and ``intermediate_layer_idx`` size the feature extractor (a feature-only DPT
    head with ``features`` channels); the ``tracker_*`` fields, ``num_virtual_tracks`` and ``max_scale``
    are those of upstream's ``BaseTrackerPredictor``, whose defaults upstream's ``TrackHead`` keeps.
    """

    dim_in: int = 2048
    patch_size: int = 14
    features: int = 128
    iters: int = 4
    predict_conf: bool = True
    stride: int = 2
    corr_levels: int = 7
    corr_radius: int = 4
    hidden_size: int = 384
    out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    intermediate_layer_idx: tuple[int, int, int, int] = (4, 11, 17, 23)
    down_ratio: int = 2
    tracker_depth: int = 6
    tracker_num_heads: int = 8
    num_virtual_tracks: int = 64
    max_scale: int = 518


def _depth_head_default() -> DPTHeadConfig:
    return DPTHeadConfig(output_dim=2, activation="exp")


HEAD_NAMES = ("camera_head", "depth_head", "point_head", "track_head")


@dataclass(frozen=True)
class VGGTConfig:
    """The whole VGGT: aggregator and heads. ``VGGTConfig()`` is ``facebook/VGGT-1B``."""

    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    camera_head: CameraHeadConfig = field(default_factory=CameraHeadConfig)
    depth_head: DPTHeadConfig = field(default_factory=_depth_head_default)
    point_head: DPTHeadConfig = field(default_factory=DPTHeadConfig)
    track_head: TrackHeadConfig = field(default_factory=TrackHeadConfig)

    @property
    def img_size(self) -> int:
        return self.aggregator.img_size

    @property
    def patch_size(self) -> int:
        return self.aggregator.patch_size

    @property
    def embed_dim(self) -> int:
        return self.aggregator.embed_dim

    @property
    def patch_start_idx(self) -> int:
        return self.aggregator.patch_start_idx

    @classmethod
    def vggt_1b(cls, img_size: int = 518, patch_size: int = 14, embed_dim: int = 1024) -> VGGTConfig:
        """VGGT-1B, or its architecture at another image size, patch size or width (upstream's
        ``VGGT(img_size, patch_size, embed_dim)``)."""
        sizes = {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim}
        aggregator = AggregatorConfig(patch_embed=PatchEmbedConfig(**sizes), **sizes)
        return cls.for_aggregator(aggregator)

    @classmethod
    def for_aggregator(cls, aggregator: AggregatorConfig) -> VGGTConfig:
        """VGGT-1B's heads fitted to ``aggregator``: token width ``2 * embed_dim``, its patch size.

        The DPT heads keep VGGT-1B's ``intermediate_layer_idx`` (4, 11, 17, 23), which needs 24 layers:
        give a shallower aggregator's heads their own in a full config.
        """
        dims = {"dim_in": 2 * aggregator.embed_dim}
        dense = dims | {"patch_size": aggregator.patch_size}
        default = cls()
        return cls(
            aggregator=aggregator,
            camera_head=replace(default.camera_head, **dims),
            depth_head=replace(default.depth_head, **dense),
            point_head=replace(default.point_head, **dense),
            track_head=replace(default.track_head, **dense),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VGGTConfig:
        """From :meth:`to_dict`'s layout, or from :class:`AggregatorConfig` fields alone (then the heads
        are VGGT-1B's, fitted by :meth:`for_aggregator`)."""
        if "aggregator" not in data:
            return cls.for_aggregator(AggregatorConfig.from_dict(data))
        data = dict(data)
        base = cls.for_aggregator(AggregatorConfig.from_dict(data.pop("aggregator")))
        heads = {
            "camera_head": CameraHeadConfig,
            "depth_head": DPTHeadConfig,
            "point_head": DPTHeadConfig,
            "track_head": TrackHeadConfig,
        }
        unknown = sorted(set(data) - set(heads))
        if unknown:
            raise ValueError(f"unknown VGGTConfig field(s): {', '.join(unknown)}")
        given = {}
        for name, value in data.items():
            merged = asdict(getattr(base, name)) | value
            given[name] = _with_tuples(heads[name], merged)
        return replace(base, **given)

    @classmethod
    def from_reference_json(cls, reference: dict) -> VGGTConfig:
        """Build from upstream's reference JSON of a full model (``aggregator``, ``patch_embed`` and one
        entry per head, the track head's ``feature_extractor ...`` included)."""
        aggregator = AggregatorConfig.from_reference_json(reference)
        track = dict(reference["track_head"])
        extractor_key = next(k for k in track if k.startswith("feature_extractor"))
        extractor = track.pop(extractor_key)
        track = {k: v for k, v in track.items() if k in {f.name for f in fields(TrackHeadConfig)}}
        track |= {k: extractor[k] for k in ("out_channels", "intermediate_layer_idx", "down_ratio")}
        if extractor["features"] != track["features"] or extractor["dim_in"] != track["dim_in"]:
            raise ValueError("the track head's feature extractor must have the head's dim_in and features")
        return cls(
            aggregator=aggregator,
            camera_head=_with_tuples(CameraHeadConfig, reference["camera_head"]),
            depth_head=_with_tuples(DPTHeadConfig, reference["depth_head"]),
            point_head=_with_tuples(DPTHeadConfig, reference["point_head"]),
            track_head=_with_tuples(TrackHeadConfig, track),
        )
