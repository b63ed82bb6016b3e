"""Look inside VGGT, layer by layer and head by head: capture, export, open and view its attention.

The Python API (:mod:`vggt.api`)::

    import vggt

    model = vggt.load_model()                               # facebook/VGGT-1B, device and dtype "auto"
    attention = vggt.capture_attention(model, "path/to/images", stride=2)
    maps = attention.query_maps("layer_24", qi=10)           # float32 probabilities, in memory
    attention.save("attn_kitchen")                          # or vggt.export_attention(model, ...)
    export = vggt.open_export("attn_kitchen")               # also a .zip or hf://datasets/<owner>/<name>

``import vggt`` loads no torch: each function imports what it needs when called, so that the reader and
the viewer work on machines without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["capture_attention", "export_attention", "load_model", "open_export", "__version__"]

if TYPE_CHECKING:
    from vggt.api import capture_attention, export_attention, load_model, open_export


def __getattr__(name: str) -> Any:
    if name in ("capture_attention", "export_attention", "load_model", "open_export"):
        from vggt import api

        return getattr(api, name)
    raise AttributeError(f"module 'vggt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
