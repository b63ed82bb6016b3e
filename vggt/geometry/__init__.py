"""Geometry of images, frames and scenes.

numpy only (this package's ``__init__`` imports nothing from torch, so that the viewer and the analysis
stay torch-free): :mod:`.placement` (where an original image lands in the frame the model saw),
:mod:`.scene` (pinhole cameras and depth maps of a scene with known geometry), :mod:`.correspondence`
(where the query points lie in every frame: truly, or by predicted depth and cameras), :mod:`.depth`
(upstream's ``unproject_depth_map_to_point_map``). Modules that need torch are imported by their full path:
:mod:`vggt.geometry.pose_encoding` (upstream's ``pose_encoding_to_extri_intri`` and
``extri_intri_to_pose_encoding``) and :mod:`vggt.geometry.rotation`.

Conventions (OpenCV, as upstream VGGT): camera x right, y down, z forward; an extrinsic ``[R | t]``
maps world to camera; pixel ``(u, v)`` is (column, row) with the centre of the top-left pixel at
``(0, 0)``; VGGT's predicted world frame is the first camera's.
"""
