"""The viewer on exports with geometry: each frame's map carries the clicked cell's point by every source
(truth, track head, depth and cameras), a frame says where a source does not see it, and each frame's
caption gives the attention's peak cell there and its distance in cells from each marker."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.test_viewer import in_mode, load, select, text
from vggt.attn_format import open_export
from vggt.testing.synthetic import write_synthetic_export
from vggt.viewer.markers import STYLES
from vggt.viewer.state import CACHE

H_P, W_P = 4, 5


@pytest.fixture(autouse=True)
def _fresh_cache():
    CACHE.clear()
    yield
    CACHE.clear()


@pytest.fixture()
def geometry_export(tmp_path: Path) -> Path:
    return write_synthetic_export(tmp_path / "geometry", num_frames=3, H_p=H_P, W_p=W_P, geometry=True)


def _click_cell(path: Path, row: int, col: int, layer: str = "layer_02"):
    loaded = load(path)
    return select(loaded.session, col * 14 + 7, row * 14 + 7, layer)


def test_markers_at_each_sources_positions(geometry_export: Path) -> None:
    row, col = 1, 2
    qi = row * W_P + col
    out = _click_cell(geometry_export, row, col)
    geometry = open_export(geometry_export).geometry()
    cells = out.overlays["view"]["rows"][0]["cells"]
    assert len(cells) == 3
    for frame, cell in enumerate(cells):
        drawn = {marker["label"]: marker for marker in cell["markers"]}
        for source in geometry.sources:
            xy, visible = geometry.correspondence(source)
            style = STYLES[source]
            assert visible[frame, qi]  # this cell's point is seen everywhere in the synthetic scene
            marker = drawn[style.label]
            assert (marker["x"], marker["y"]) == (float(xy[frame, qi, 0]), float(xy[frame, qi, 1]))
            assert (marker["shape"], marker["color"]) == (style.shape, style.color)
        assert "not visible" not in cell["caption"]
    # the synthetic truth moves one patch to the right per frame; the track head's is 3 px right, 2 up
    truth = [m for m in cells[2]["markers"] if m["label"] == "truth"][0]
    assert (truth["x"], truth["y"]) == (col * 14 + 6.5 + 28, row * 14 + 6.5)
    track = [m for m in cells[2]["markers"] if m["label"] == "track head"][0]
    assert (track["x"], track["y"]) == (truth["x"] + 3, truth["y"] - 2)
    assert len({marker["shape"] for marker in cells[1]["markers"]}) == 3  # distinct markers
    readout = text(out.query_view)
    assert (
        "Markers, the clicked cell's point in each frame: truth = green circle · track head = cyan cross"
        in readout
    )


def test_a_point_a_source_does_not_see_is_said_and_not_drawn(geometry_export: Path) -> None:
    row, col = H_P - 1, W_P - 1  # the last query: it leaves the frame, and the track head loses it
    out = _click_cell(geometry_export, row, col)
    cells = out.overlays["view"]["rows"][0]["cells"]
    assert [m["label"] for m in cells[0]["markers"]] == ["truth", "track head", "depth + cameras"]
    assert cells[0]["caption"].startswith("frame 0 · view_000.png · peak cell (")
    assert "not visible" not in cells[0]["caption"]
    assert cells[2]["markers"] == []
    assert cells[2]["caption"].startswith("frame 2 · view_002.png · peak cell (")
    assert cells[2]["caption"].endswith(
        "truth not visible · track head not visible · depth + cameras not visible"
    )
    # a figure's column title (the view's columns) keeps the short form
    title = "frame 2 · view_002.png · not visible: truth, track head, depth + cameras"
    assert out.overlays["view"]["columns"][2] == title


def test_captions_give_the_peak_cell_and_its_distance_from_each_marker(geometry_export: Path) -> None:
    row, col = 2, 1
    qi = row * W_P + col
    out = _click_cell(geometry_export, row, col)
    export = open_export(geometry_export)
    maps = export.query_maps("layer_02", qi)  # [S, H_ds, W_ds]
    geometry = export.geometry()
    captions = [cell["caption"] for cell in out.overlays["view"]["rows"][0]["cells"]]
    for frame in range(3):
        peak = np.unravel_index(int(np.argmax(maps[frame])), maps[frame].shape)
        parts = []
        for source in geometry.sources:
            x, y = geometry.correspondence(source)[0][frame, qi]
            cell = (int((y + 0.5) // 14), int((x + 0.5) // 14))  # stride 1: a cell is a patch
            distance = np.hypot(cell[0] - peak[0], cell[1] - peak[1])
            parts.append(f"{STYLES[source].label} {distance:.1f} cells")
        expected = f"frame {frame} · view_{frame:03d}.png · peak cell ({peak[0]}, {peak[1]}) · " + " · ".join(
            parts
        )
        assert captions[frame] == expected


def test_composites_carry_the_markers_too(geometry_export: Path) -> None:
    out = _click_cell(geometry_export, 1, 1)
    layers = in_mode(out.session, "layers", "layer_02").overlays
    assert all(len(cell["markers"]) == 3 for row in layers["view"]["rows"] for cell in row["cells"])
    assert "Markers, the clicked cell's point" in text(out.query_view)


def test_an_export_without_geometry_has_no_markers(tmp_path: Path) -> None:
    plain = write_synthetic_export(tmp_path / "plain", num_frames=2, H_p=H_P, W_p=W_P)
    out = _click_cell(plain, 1, 1)
    assert all(cell["markers"] == [] for cell in out.overlays["view"]["rows"][0]["cells"])
    assert "Markers" not in text(out.query_view)


def test_a_damaged_geometry_part_still_shows_the_maps(geometry_export: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(geometry_export, tmp_path / "damaged"))
    (copy / "geometry" / "geometry.npz").write_bytes(b"not a zip")
    out = _click_cell(copy, 1, 1)
    assert out.message == ""
    assert len(out.overlays["view"]["rows"][0]["cells"]) == 3
    assert "Geometry not shown: geometry:" in text(out.query_view)
