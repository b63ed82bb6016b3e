"""Shared fixtures: the tiny reference model produced by upstream VGGT (see tests/fixtures/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vggt.models.config import AggregatorConfig
from vggt.models.vggt import VGGT

FIXTURES = Path(__file__).parent / "fixtures"


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
    model = VGGT(tiny_config).eval()
    weights = {k: v for k, v in tiny_reference.items() if k.startswith("aggregator.")}
    model.load_state_dict(weights, strict=True)
    return model
