"""VGGT's prediction heads: camera, DPT (depth and world points) and tracking.

Each head reads the aggregator's outputs (``[B, S, P, 2C]`` per block: frame and global tokens
concatenated) and keeps upstream's module and parameter names, so that ``facebook/VGGT-1B`` loads as
it is.
"""

from .camera import CameraHead
from .dpt import DPTHead
from .track import TrackHead

__all__ = ["CameraHead", "DPTHead", "TrackHead"]
