"""Geometry of images, frames and scenes.

numpy only (this package's ``__init__`` imports nothing from torch, so that the viewer and the analysis
stay torch-free): :mod:`.placement` (where an original image lands in the frame the model saw),
:mod:`.scene` (pinhole cameras and depth maps of a scene with known geometry), :mod:`.correspondence`
(true positions of the query cells in every frame). Modules that need torch are imported by their
full path.
"""
