"""Top-level VGGT module: holds the aggregator under upstream's parameter names."""

from __future__ import annotations

from torch import Tensor, nn

from .aggregator import Aggregator
from .config import AggregatorConfig


class VGGT(nn.Module):
    """VGGT with its aggregator at ``model.aggregator``.

    ``VGGT()`` builds the ``facebook/VGGT-1B`` architecture. The camera, depth, point and track
    heads are not built: this toolkit reads attention, which lives entirely in the aggregator.
    Parameter names and shapes equal upstream's ``aggregator.*`` entries, so upstream checkpoints
    load as they are (see :mod:`vggt.weights`).
    """

    def __init__(self, config: AggregatorConfig | None = None) -> None:
        super().__init__()
        self.config = config or AggregatorConfig.vggt_1b()
        self.aggregator = Aggregator(self.config)

    def forward(self, images: Tensor) -> tuple[list[Tensor], int]:
        """``images`` ``[S, 3, H, W]`` or ``[B, S, 3, H, W]`` in [0, 1] -> the aggregator's outputs."""
        if images.dim() == 4:
            images = images.unsqueeze(0)
        return self.aggregator(images)
