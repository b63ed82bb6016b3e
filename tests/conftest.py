"""Shared fixtures: the tiny reference model produced by upstream VGGT (see tests/fixtures/README.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from vggt.export import ExportOptions, export_attention
from vggt.export_cli import main
from vggt.models.config import AggregatorConfig, VGGTConfig
from vggt.models.vggt import VGGT

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLE_IMAGES = Path(__file__).parents[1] / "examples" / "synthetic_room" / "images"


@pytest.fixture(scope="session")
def tiny_reference() -> dict[str, torch.Tensor]:
    """All tensors of the tiny reference: ``aggregator.*`` weights, ``input.images``, ``expected.*``."""
    return load_file(FIXTURES / "tiny_vggt_reference.safetensors")


@pytest.fixture(scope="session")
def tiny_config() -> AggregatorConfig:
    return AggregatorConfig.from_reference_json(
        json.loads((FIXTURES / "tiny_vggt_reference.json").read_text())
    )


@pytest.fixture()
def tiny_model(tiny_config, tiny_reference) -> VGGT:
    """The tiny reference model with upstream's random weights, in eval mode, float32 on CPU."""
    model = VGGT.from_config(tiny_config, heads=False).eval()
    weights = {k: v for k, v in tiny_reference.items() if k.startswith("aggregator.")}
    model.load_state_dict(weights, strict=True)
    return model


@pytest.fixture(scope="session")
def tiny_heads_config() -> VGGTConfig:
    """The tiny full VGGT (all four heads) of ``tiny_vggt_heads_reference``."""
    return VGGTConfig.from_reference_json(
        json.loads((FIXTURES / "tiny_vggt_heads_reference.json").read_text())
    )


@pytest.fixture(scope="session")
def tiny_heads_state_dict() -> dict[str, torch.Tensor]:
    """Its weights under upstream's state-dict names (a full checkpoint)."""
    tensors = load_file(FIXTURES / "tiny_vggt_heads_reference.safetensors")
    return {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}


@pytest.fixture()
def export_tiny(tiny_model, tiny_reference):
    """``export_tiny(out, **options)``: export the tiny model's attention on the fixture's 3 frames
    (sources ``a.png``, ``b.png``, ``c.png``) with ``ExportOptions(**options)``; returns ``out``."""

    def run(out: Path, **options) -> Path:
        images = tiny_reference["input.images"][0]
        return export_attention(
            tiny_model, images, out, sources=["a.png", "b.png", "c.png"], options=ExportOptions(**options),
            progress=False,
        )  # fmt: skip

    return run


@pytest.fixture()
def tiny_model_files(tmp_path, tiny_model, tiny_config) -> SimpleNamespace:
    """The tiny reference model as a user has it: ``checkpoint`` (a safetensors file) and ``config``
    (its architecture, for ``config=`` or ``--model_config``)."""
    checkpoint = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, checkpoint)
    config = tmp_path / "tiny_config.json"
    config.write_text(json.dumps(tiny_config.to_dict()))
    return SimpleNamespace(checkpoint=checkpoint, config=config, config_object=tiny_config)


@pytest.fixture()
def tiny_cli(tmp_path, tiny_model_files):
    """``tiny_cli(*args, with_checkpoint=True)``: the exporter's CLI on the tiny model (saved as a
    checkpoint, its architecture in a JSON file) over 5 of the bundled images; returns the exit code."""
    checkpoint, config = tiny_model_files.checkpoint, tiny_model_files.config
    images = tmp_path / "images"
    images.mkdir()
    for index in (0, 2, 3, 5, 7):
        shutil.copy(EXAMPLE_IMAGES / f"view_{index:02d}.png", images / f"view_{index:02d}.png")

    def run(*args: str, with_checkpoint: bool = True) -> int:
        weights = ["--checkpoint", str(checkpoint)] if with_checkpoint else []
        return main([*weights, "--model_config", str(config), "--image_dir", str(images), "--quiet", *args])

    run.images = images
    run.checkpoint = checkpoint
    run.config = config
    return run
