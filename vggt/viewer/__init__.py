"""Gradio viewer over attention exports (numpy, Pillow and Gradio only; never torch)."""
