"""Camera head: a pose encoding per frame, refined iteratively from the camera tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import Block, Mlp
from .activations import activate_pose

POSE_ENCODING_SIZES = {"absT_quaR_FoV": 9}


class CameraHead(nn.Module):
    """Predict each frame's pose encoding from its camera token of the last aggregator block.

    Each iteration embeds the current estimate (a learned empty pose at first), turns it into a
    shift, scale and gate that modulate the normalized camera tokens (adaptive LayerNorm, as in DiT),
    runs the trunk (transformer blocks attending across frames) and adds the predicted correction.

    Encoding ``absT_quaR_FoV`` (9 values): translation (3), quaternion ``x, y, z, w`` (4), vertical and
    horizontal field of view in radians (2); see :mod:`vggt.geometry.pose_encoding`.
    """

    def __init__(
        self,
        dim_in: int = 2048,
        trunk_depth: int = 4,
        pose_encoding_type: str = "absT_quaR_FoV",
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
        trans_act: str = "linear",
        quat_act: str = "linear",
        fl_act: str = "relu",
    ) -> None:
        super().__init__()
        if pose_encoding_type not in POSE_ENCODING_SIZES:
            raise ValueError(f"unsupported camera encoding {pose_encoding_type!r}")
        self.target_dim = POSE_ENCODING_SIZES[pose_encoding_type]
        self.trans_act, self.quat_act, self.fl_act = trans_act, quat_act, fl_act

        self.trunk = nn.Sequential(
            *(Block(dim_in, num_heads, mlp_ratio, init_values=init_values) for _ in range(trunk_depth))
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.embed_pose = nn.Linear(self.target_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, out_dim=self.target_dim)

    def forward(self, aggregated_tokens_list: list[Tensor], num_iterations: int = 4) -> list[Tensor]:
        """Pose encodings ``[B, S, 9]`` after each of ``num_iterations`` refinements (activated)."""
        pose_tokens = self.token_norm(aggregated_tokens_list[-1][:, :, 0])
        batch, frames, _ = pose_tokens.shape
        normalized = self.adaln_norm(pose_tokens)
        pose_enc = None
        encodings = []
        for _ in range(num_iterations):
            if pose_enc is None:
                condition = self.embed_pose(self.empty_pose_tokens.expand(batch, frames, -1))
            else:
                condition = self.embed_pose(pose_enc.detach())
            shift, scale, gate = self.poseLN_modulation(condition).chunk(3, dim=-1)
            x = gate * (normalized * (1 + scale) + shift) + pose_tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
            pose_enc = delta if pose_enc is None else pose_enc + delta
            encodings.append(activate_pose(pose_enc, self.trans_act, self.quat_act, self.fl_act))
        return encodings
