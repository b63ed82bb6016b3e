"""The README as a user meets it: its Python code runs as written, its flag table is the exporter's --help.

The Python blocks run in order, in one namespace, in a fresh folder that holds the bundled example, on
this CPU. Only the weights are substituted where they would be downloaded: ``vggt.load_model`` and
``VGGT.from_pretrained`` build the tiny reference model (tests/fixtures) instead of VGGT-1B, with the
arguments the README gives them otherwise. The export that the quick start's command makes is stood in
for by a synthetic export of as many layers (the command line itself is tested in test_export.py).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from safetensors.torch import save_file

import vggt.api
from vggt.export_cli import build_parser
from vggt.models.vggt import VGGT
from vggt.testing.synthetic import write_synthetic_export

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


@pytest.fixture()
def tiny_weights_everywhere(tmp_path, monkeypatch, tiny_heads_config, tiny_heads_state_dict):
    """``vggt.load_model`` and ``VGGT.from_pretrained`` give the tiny full VGGT, whatever hub id is asked."""
    checkpoint = tmp_path / "tiny_full.safetensors"
    save_file({key: value.contiguous() for key, value in tiny_heads_state_dict.items()}, checkpoint)
    load_model, from_pretrained = vggt.api.load_model, VGGT.from_pretrained.__func__

    def tiny_load_model(model_id=None, **kwargs):
        assert model_id is None and kwargs.get("checkpoint") is None  # the README downloads VGGT-1B
        return load_model(**(kwargs | {"checkpoint": checkpoint, "config": tiny_heads_config}))

    def tiny_from_pretrained(cls, name="facebook/VGGT-1B", **kwargs):
        assert name == "facebook/VGGT-1B"
        return from_pretrained(cls, checkpoint, **(kwargs | {"config": tiny_heads_config}))

    monkeypatch.setattr(vggt.api, "load_model", tiny_load_model)
    monkeypatch.setattr(VGGT, "from_pretrained", classmethod(tiny_from_pretrained))


def test_readme_python_code_runs_as_written(tiny_weights_everywhere, tmp_path, monkeypatch) -> None:
    blocks = python_blocks(README)
    assert len(blocks) >= 3
    (tmp_path / "examples").symlink_to(REPO / "examples")
    # What the quick start's command writes: every global layer of VGGT-1B, here synthetic.
    write_synthetic_export(tmp_path / "attn_first2all_synthetic_room", num_layers=24, H_p=14, W_p=19)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README.md's python block {number} failed: {error!r}\n{block}") from error
    assert (tmp_path / "attn_room" / "attn_maps" / "layers_manifest.json").is_file()


def _table_rows(text: str, heading: str) -> dict[str, str]:
    """The rows of the first table after ``heading``, by each flag they name."""
    section = text[text.index(heading) :]
    table = section[section.index("\n| flag |") :].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[3:]:
        for flag in re.findall(r"`(--[a-z_]+)`", line.split("|")[1]):
            rows[flag] = line
    return rows


def test_the_flag_table_is_the_exporters_help() -> None:
    """Every flag of ``--help`` is in the README's table and every flag of the table in ``--help``; a
    default ``--help`` gives is the default the table gives."""
    rows = _table_rows(README, "## Exporting attention")
    parser = build_parser()
    flags = {}
    for action in parser._actions:
        long = [
            option for option in action.option_strings if option.startswith("--") and "-" not in option[2:]
        ]
        if long:
            flags[long[0]] = action
    assert sorted(rows) == sorted(flags)
    for flag, action in flags.items():
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or isinstance(default, bool):
            continue
        assert "%(default)s" in (action.help or ""), f"--help does not give the default of {flag}"
        assert re.search(rf"default `?{re.escape(str(default))}`?", rows[flag]), (flag, rows[flag])
