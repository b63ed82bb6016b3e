"""Architecture configuration of the VGGT aggregator."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
        """Build from the layout of upstream's reference JSON (``aggregator`` + ``patch_embed_dinov2``)."""
        agg = reference["aggregator"]
        dino = reference["patch_embed_dinov2"]
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
