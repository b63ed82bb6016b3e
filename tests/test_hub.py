"""Exports published as Hugging Face dataset repositories, opened by id (``hf://datasets/owner/name``).

Tested on caches laid out as huggingface_hub lays them out (blobs named by their content's sha256,
snapshot entries linking to them, refs naming commits), offline. Where the hub would be asked (the file
listing, a download), its two calls are replaced by a stand-in serving a folder, to see what is fetched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import constants as hub_constants

from vggt.attn_format import FormatError, open_export
from vggt.attn_format.hub import hub_url, parse_hub_path
from vggt.testing.synthetic import write_synthetic_export
from vggt.viewer.state import CACHE

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def publish(cache: Path, export: Path, repo_id: str = "ann/room", commit: str = COMMIT, ref: str = "main",
            prefix: str = "", skip: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """Lay out the files of ``export`` (under ``prefix`` in the repository) in ``cache`` as
    huggingface_hub does after downloading them at ``commit``; ``skip``: files not downloaded."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in export.rglob("*") if p.is_file()):
        relative = Path(prefix) / path.relative_to(export)
        if relative.as_posix() in skip:
            continue
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        entry = snapshot / relative
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.symlink_to(os.path.relpath(blob, entry.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline (as HF_HUB_OFFLINE=1 and HF_HUB_CACHE set it)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture()
def room(tmp_path) -> Path:
    return write_synthetic_export(tmp_path / "room", num_layers=3, per_head=True, H_p=6, W_p=7, seed=3)


def assert_same_export(a, b) -> None:
    assert a.layer_names == b.layer_names and a.frame_sources == b.frame_sources
    for name in a.layer_names:
        for qi in (0, 5, a.layer_meta(name)["Q"] - 1):
            np.testing.assert_array_equal(a.query_maps(name, qi), b.query_maps(name, qi))
    np.testing.assert_array_equal(a.frames()[1], b.frames()[1])


def test_ids_and_revisions_parse_as_the_hub_writes_them() -> None:
    assert parse_hub_path("hf://datasets/ann/room") == ("ann/room", None, "")
    assert parse_hub_path("hf://datasets/ann/room@v1/exports/a") == ("ann/room", "v1", "exports/a")
    assert parse_hub_path("hf://datasets/ann/room@refs%2Fpr%2F3") == ("ann/room", "refs/pr/3", "")
    assert hub_url("ann/room@v2") == "hf://datasets/ann/room@v2"
    for bad in (
        "hf://datasets/ann",
        "hf://datasets/../x",
        "hf://datasets/ann/room/../../etc",
        "hf://datasets/a/b@",
    ):
        with pytest.raises(FormatError):
            parse_hub_path(bad)


def test_a_cached_dataset_opens_offline_by_id_revision_and_folder(hub_cache, room, tmp_path) -> None:
    publish(hub_cache, room)
    with open_export("hf://datasets/ann/room") as export:
        assert export.files.commit == COMMIT and export.files.offline
        assert_same_export(export, open_export(room))
    # A tag names an older commit; a folder of the repository holds another export.
    older = write_synthetic_export(tmp_path / "older", num_layers=2, seed=9)
    publish(hub_cache, older, commit=OLD_COMMIT, ref="v1")
    assert_same_export(open_export("hf://datasets/ann/room@v1"), open_export(older))
    assert_same_export(open_export(f"hf://datasets/ann/room@{OLD_COMMIT}"), open_export(older))
    publish(hub_cache, older, repo_id="ann/many", prefix="exports/older")
    assert_same_export(open_export("hf://datasets/ann/many/exports/older"), open_export(older))
    with pytest.raises(
        FormatError, match=r"^dataset ann/room at revision 'v9' is not in the local Hugging Face"
    ):
        open_export("hf://datasets/ann/room@v9")
    with pytest.raises(FormatError, match="ann/other"):
        open_export("hf://datasets/ann/other")


def test_offline_a_layer_not_in_the_cache_is_named_when_read(hub_cache, room) -> None:
    publish(hub_cache, room, skip=("attn_maps/layer_02/heatmaps_uint8.npz",))
    export = open_export("hf://datasets/ann/room")
    assert export.layer_names == ["layer_01", "layer_02", "layer_03"]
    assert export.query_maps("layer_01", 3).shape == (4, 3, 6, 7)
    with pytest.raises(FormatError, match=r"^layer layer_02 NPZ of dataset ann/room is not in the local"):
        export.query_maps("layer_02", 3)


def test_a_snapshot_entry_leading_outside_the_dataset_is_refused(hub_cache, room, tmp_path) -> None:
    snapshot = publish(hub_cache, room)
    secret = tmp_path / "secret.json"
    secret.write_text('{"layers": []}')
    manifest = snapshot / "attn_maps" / "layers_manifest.json"
    manifest.unlink()
    manifest.symlink_to(secret)
    with pytest.raises(FormatError, match="outside the dataset's cache"):
        open_export("hf://datasets/ann/room")


class StandInHub:
    """The hub's two calls the reader makes, serving ``folder`` as the dataset ``ann/room``: the
    listing (``HfApi.repo_info``) and a download into the cache (``hf_hub_download``)."""

    def __init__(self, folder: Path, cache: Path, monkeypatch, sizes: dict[str, int] | None = None) -> None:
        self.folder, self.cache, self.fetched = folder, cache, []
        files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
        self.siblings = [
            SimpleNamespace(rfilename=name, size=size) for name, size in (files | (sizes or {})).items()
        ]
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", self.repo_info)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.download)

    def repo_info(self, repo_id, repo_type=None, revision=None, files_metadata=False):
        assert (repo_id, repo_type, files_metadata) == ("ann/room", "dataset", True)
        return SimpleNamespace(sha=COMMIT, siblings=self.siblings)

    def download(self, repo_id, filename, repo_type=None, revision=None, cache_dir=None):
        assert (repo_id, repo_type, revision) == ("ann/room", "dataset", COMMIT)
        self.fetched.append(filename)
        source = self.folder / filename
        staged = self.cache.parent / "one_file"
        shutil.rmtree(staged, ignore_errors=True)
        (staged / filename).parent.mkdir(parents=True)
        shutil.copy(source, staged / filename)
        publish(self.cache, staged)
        return str(self.cache / "datasets--ann--room" / "snapshots" / COMMIT / filename)


def test_online_only_the_layers_a_view_needs_are_fetched(hub_cache, room, monkeypatch) -> None:
    hub = StandInHub(room, hub_cache, monkeypatch)
    export = open_export("hf://datasets/ann/room")
    assert not export.files.offline
    assert not [name for name in hub.fetched if name.endswith(".npz")]  # opening reads the JSON files
    export.query_maps("layer_02", 4)
    layers = [name for name in hub.fetched if name.endswith(".npz")]
    assert layers == ["attn_maps/layer_02/heatmaps_uint8.npz"]
    export.query_maps("layer_02", 5)
    assert [name for name in hub.fetched if name.endswith(".npz")] == layers  # in the cache now
    assert_same_export(export, open_export(room))


def test_online_sizes_are_checked_before_and_after_a_download(hub_cache, room, monkeypatch) -> None:
    layer = "attn_maps/layer_01/heatmaps_uint8.npz"
    hub = StandInHub(room, hub_cache, monkeypatch, sizes={layer: 123})
    export = open_export("hf://datasets/ann/room")
    with pytest.raises(FormatError, match="the hub lists 123"):
        export.query_maps("layer_01", 0)
    monkeypatch.setattr("vggt.attn_format.limits.MAX_DOWNLOAD_BYTES", 1)
    big = StandInHub(room, hub_cache.parent / "hub2", monkeypatch)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache.parent / "hub2"))
    with pytest.raises(FormatError, match=r"downloads \(limit\)"):
        open_export("hf://datasets/ann/room")
    assert big.fetched == [] and hub.fetched


def test_hub_variables_of_the_users_shell_are_followed(room, tmp_path) -> None:
    """HF_HUB_CACHE and HF_HUB_OFFLINE in the environment, as a user sets them, in a fresh process."""
    cache = tmp_path / "user-cache"
    publish(cache, room)
    code = "import sys, vggt; print(vggt.open_export(sys.argv[1]).layer_names)"
    env = os.environ | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", code, "hf://datasets/ann/room"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['layer_01', 'layer_02', 'layer_03']"


def test_the_viewer_opens_a_dataset_by_id(hub_cache, room) -> None:
    publish(hub_cache, room)
    loaded = CACHE.open("hf://datasets/ann/room")
    assert loaded.export.layer_names == ["layer_01", "layer_02", "layer_03"]


def test_the_viewer_and_the_analysis_take_a_repo(hub_cache, room, tmp_path, monkeypatch, capsys) -> None:
    from vggt.analysis.cli import main as analyze
    from vggt.viewer.cli import main as view

    publish(hub_cache, room)
    assert view(["--repo", "ann/missing"]) == 2
    assert "dataset ann/missing is not in the local Hugging Face cache" in capsys.readouterr().err
    assert view(["--repo", "ann/room", "--attn_dir", str(room)]) == 2
    monkeypatch.chdir(tmp_path)
    assert analyze(["--repo", "ann/room", "--no_figures", "--quiet", "--workers", "1"]) == 0
    assert (tmp_path / "room_analysis" / "layer_head_metrics.csv").is_file()  # not in the hub's cache
