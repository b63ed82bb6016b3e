"""Attention export and viewer for VGGT."""

__version__ = "0.1.0"
