"""On-disk format of an attention export: the one writer and the one reader.

An export is a folder::

    <out>/images/frame_00.png ...                   frames as the model saw them, model order
    <out>/attn_maps/layers_manifest.json            what the export holds (see ``attn_maps_schema.md``)
    <out>/attn_maps/layer_01/heatmaps_uint8.npz     keys "heatmaps", "special_mass" (+ "token_*")
    <out>/attn_maps/layer_01_metadata.json          everything needed to read that layer

Every path written inside a JSON file is relative to the ``attn_maps/`` folder, so a moved or zipped
export opens as is. The reader also opens exports written by the seed fork's exporter (no special-token
mass, absolute or cwd-relative paths, possibly no ``images/`` folder).

The package depends on numpy and Pillow only: it never imports torch, so that a shared export opens fast
on a machine without it. Modules: :mod:`.schema` (names, fields, checks, JSON), :mod:`.limits` (the caps
on what an export may ask the reader to hold), :mod:`.npz` (NPZ members, memory-mapped), :mod:`.paths`
(zips and paths inside an export), :mod:`.grid` (the query grid in pixels), :mod:`.writer`,
:mod:`.reader`. An export is untrusted input: every problem with one is a one-line :class:`FormatError`,
and nothing else escapes the reader.
"""

from vggt.attn_format.paths import resolve_in_export
from vggt.attn_format.reader import AttnExport, open_export
from vggt.attn_format.schema import (
    ATTN_DIR_NAME,
    HEATMAPS_KEY,
    IMAGES_DIR_NAME,
    LAYER_KINDS,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SPECIAL_MASS_KEY,
    TOKEN_HEATMAPS_KEY,
    TOKEN_SPECIAL_MASS_KEY,
    FormatError,
    layer_name,
    query_grid_shape,
    special_token_names,
)
from vggt.attn_format.writer import ExportWriter

__all__ = [
    "ATTN_DIR_NAME",
    "HEATMAPS_KEY",
    "IMAGES_DIR_NAME",
    "LAYER_KINDS",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "SPECIAL_MASS_KEY",
    "TOKEN_HEATMAPS_KEY",
    "TOKEN_SPECIAL_MASS_KEY",
    "AttnExport",
    "ExportWriter",
    "FormatError",
    "layer_name",
    "open_export",
    "query_grid_shape",
    "resolve_in_export",
    "special_token_names",
]
