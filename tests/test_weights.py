"""Finding and loading checkpoints: local files and folders, a local hub cache, and the failure modes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import save_file
from torch import nn

from vggt.arguments import command_line_spelling
from vggt.models.vggt import VGGT
from vggt.weights import (
    DEFAULT_MODEL_ID,
    LoadReport,
    ResolvedCheckpoint,
    WeightsError,
    load_aggregator_state_dict,
    load_weights,
    resolve_checkpoint,
    sha256_file,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HEADS = {
    "camera_head.trunk.0.weight": torch.randn(8, 8),
    "camera_head.trunk.0.bias": torch.randn(8),
    "camera_head.pose_branch.fc1.weight": torch.randn(4, 8),
    "depth_head.scratch.output_conv.weight": torch.randn(1, 8, 3, 3),
}


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: huggingface_hub reads the env at import, so patch both."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture()
def source_model(tiny_config) -> VGGT:
    """A tiny model whose weights get saved; seeded differently from the models they are loaded into."""
    torch.manual_seed(1)
    model = VGGT.from_config(tiny_config, heads=False).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    return model


@pytest.fixture()
def target_model(tiny_config) -> VGGT:
    torch.manual_seed(2)
    return VGGT.from_config(tiny_config, heads=False).eval()


def full_checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    """Aggregator weights of ``model`` plus fake head tensors, like a full upstream checkpoint."""
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tensors.update(HEADS)
    return tensors


def assert_same_weights(model: nn.Module, reference: nn.Module) -> None:
    expected = reference.state_dict()
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    for key, tensor in actual.items():
        assert torch.equal(tensor, expected[key].to(tensor.dtype)), key


def make_hub_cache(cache: Path, files: dict[str, bytes], model_id: str = DEFAULT_MODEL_ID) -> Path:
    """Lay out ``files`` in ``cache`` as huggingface_hub does; returns the snapshot folder."""
    repo = cache / f"models--{model_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


# --------------------------------------------------------------------------------------------------
# Local files


def test_safetensors_file_loads_aggregator_and_skips_heads(
    tmp_path, source_model, target_model, tiny_reference, caplog
) -> None:
    path = tmp_path / "model.safetensors"
    save_file(full_checkpoint(source_model), path)
    n_aggregator = len(source_model.state_dict())

    resolved = resolve_checkpoint(checkpoint=str(path))
    assert resolved == ResolvedCheckpoint(path=path, model_id=None, revision=None, source="file")

    with caplog.at_level(logging.INFO, logger="vggt"):
        report = load_weights(target_model, resolved.path)

    assert report == LoadReport(loaded=n_aggregator, skipped_heads=len(HEADS), path=path)
    assert_same_weights(target_model, source_model)
    images = tiny_reference["input.images"]
    with torch.no_grad():
        tokens, _ = target_model.aggregator(images)
        expected, _ = source_model.aggregator(images)
    for got, want in zip(tokens, expected, strict=True):
        assert torch.equal(got, want)

    messages = [r.getMessage() for r in caplog.records if r.name == "vggt"]
    assert messages == [
        f"loaded {n_aggregator:,} aggregator tensors from model.safetensors; "
        f"skipped {len(HEADS)} head tensors (camera_head, depth_head)"
    ]


def test_reads_only_aggregator_tensors_of_the_reference_fixture(tiny_reference) -> None:
    path = REPO_ROOT / "tests" / "fixtures" / "tiny_vggt_reference.safetensors"
    state_dict, skipped = load_aggregator_state_dict(path)
    aggregator = {k: v for k, v in tiny_reference.items() if k.startswith("aggregator.")}
    assert state_dict.keys() == aggregator.keys()
    assert skipped == len(tiny_reference) - len(aggregator)
    for key, tensor in state_dict.items():
        assert torch.equal(tensor, aggregator[key])


@pytest.mark.parametrize(
    "layout",
    ["plain", "model_wrapper", "state_dict_wrapper", "module_prefix", "legacy_format"],
)
def test_torch_pickle_checkpoints(tmp_path, source_model, target_model, layout) -> None:
    tensors = full_checkpoint(source_model)
    kwargs = {}
    if layout == "model_wrapper":
        payload = {"model": tensors, "epoch": 7}
    elif layout == "state_dict_wrapper":
        payload = {"state_dict": tensors}
    elif layout == "module_prefix":
        payload = {f"module.{k}": v for k, v in tensors.items()}
    else:
        payload = tensors
    if layout == "legacy_format":
        # The pre-zip format cannot be memory-mapped: the loader must fall back to a plain load.
        kwargs["_use_new_zipfile_serialization"] = False
    path = tmp_path / "model.pth"
    torch.save(payload, path, **kwargs)

    report = load_weights(target_model, path)

    assert report.loaded == len(source_model.state_dict())
    assert report.skipped_heads == len(HEADS)
    assert_same_weights(target_model, source_model)


def test_folder_prefers_safetensors_then_model_pt(tmp_path, source_model, target_model) -> None:
    tensors = full_checkpoint(source_model)
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(tensors, folder / "model.pt")
    assert resolve_checkpoint(checkpoint=folder).path == folder / "model.pt"

    save_file(tensors, folder / "model.safetensors")
    resolved = resolve_checkpoint(checkpoint=folder)
    assert resolved.path == folder / "model.safetensors"
    assert resolved.source == "file"

    load_weights(target_model, resolved.path)
    assert_same_weights(target_model, source_model)


def test_folder_without_checkpoint_is_an_error(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="neither model.safetensors nor model.pt"):
        resolve_checkpoint(checkpoint=tmp_path)


def test_missing_local_file_is_named(tmp_path) -> None:
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(WeightsError, match="checkpoint not found") as info:
        resolve_checkpoint(checkpoint=missing)
    assert str(missing) in str(info.value)
    with pytest.raises(WeightsError, match="checkpoint not found"):
        load_aggregator_state_dict(missing)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_in_bfloat16(tmp_path, source_model, target_model, suffix) -> None:
    tensors = full_checkpoint(source_model)
    path = tmp_path / f"model{suffix}"
    save_file(tensors, path) if suffix == ".safetensors" else torch.save(tensors, path)

    state_dict, _ = load_aggregator_state_dict(path, dtype=torch.bfloat16)
    assert {t.dtype for t in state_dict.values()} == {torch.bfloat16}

    load_weights(target_model, path, dtype=torch.bfloat16)
    for key, tensor in target_model.state_dict().items():
        assert tensor.dtype == torch.bfloat16, key
        assert torch.equal(tensor, tensors[key].to(torch.bfloat16)), key


class _Aggregator(nn.Module):
    def __init__(self, with_constant: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(3))
        if with_constant:
            self.register_buffer("constant", torch.zeros(3), persistent=False)


class _Wrapper(nn.Module):
    def __init__(self, with_constant: bool = False) -> None:
        super().__init__()
        self.aggregator = _Aggregator(with_constant)


def test_meta_model_is_materialized_by_assignment(tmp_path) -> None:
    source = _Wrapper()
    path = tmp_path / "model.safetensors"
    save_file(full_checkpoint(source), path)
    with torch.device("meta"):
        model = _Wrapper()

    load_weights(model, path, dtype=torch.float16)

    for key, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu"
        assert torch.equal(tensor, source.state_dict()[key].half()), key
    assert isinstance(model.aggregator.proj.weight, nn.Parameter)


def test_meta_model_with_non_persistent_buffer_is_an_error(tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(full_checkpoint(_Wrapper()), path)
    with torch.device("meta"):
        model = _Wrapper(with_constant=True)
    with pytest.raises(WeightsError, match=r"meta device.*aggregator\.constant"):
        load_weights(model, path)


# --------------------------------------------------------------------------------------------------
# Checkpoints that do not fit


def test_key_and_shape_mismatches_are_named(tmp_path, source_model, target_model) -> None:
    tensors = full_checkpoint(source_model)
    dropped = "aggregator.frame_blocks.0.attn.q_norm.weight"
    del tensors[dropped]
    tensors["aggregator.foo"] = torch.zeros(2)
    reshaped = "aggregator.camera_token"
    original_shape = list(tensors[reshaped].shape)
    tensors[reshaped] = torch.zeros(1, 2, 1, 32)
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    before = {k: v.clone() for k, v in target_model.state_dict().items()}

    with pytest.raises(WeightsError) as info:
        load_weights(target_model, path)

    message = str(info.value)
    assert "does not match the model" in message
    assert f"1 missing key ({dropped})" in message
    assert "1 unexpected key (aggregator.foo)" in message
    assert f"{reshaped}: checkpoint [1, 2, 1, 32] vs model {original_shape}" in message
    # Nothing was loaded.
    for key, tensor in target_model.state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_many_missing_keys_are_abbreviated(tmp_path, target_model) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"aggregator.camera_token": target_model.aggregator.camera_token.detach().clone()}, path)
    with pytest.raises(WeightsError) as info:
        load_weights(target_model, path)
    n_missing = len(target_model.state_dict()) - 1
    assert f"{n_missing} missing keys (" in str(info.value)
    assert ", ...)" in str(info.value)


def test_checkpoint_without_aggregator_is_an_error(tmp_path, target_model) -> None:
    path = tmp_path / "heads.safetensors"
    save_file(dict(HEADS), path)
    with pytest.raises(WeightsError, match=r"no aggregator\.\* tensors"):
        load_weights(target_model, path)


class _RunsCode:
    """Unpickling this would create a file: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_objects_are_refused_not_executed(tmp_path, source_model) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "model.pt"
    payload = full_checkpoint(source_model)
    payload["payload"] = _RunsCode(marker)
    torch.save(payload, path)

    with pytest.raises(WeightsError, match="refusing to load") as info:
        load_aggregator_state_dict(path)

    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "data"),
    [("model.pt", b"definitely not a checkpoint"), ("model.safetensors", b"PK\x03\x04 broken zip")],
)
def test_unreadable_file_is_named(tmp_path, name, data) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(WeightsError, match="cannot read checkpoint") as info:
        load_aggregator_state_dict(path)
    assert str(path) in str(info.value)


def test_sha256_file_matches_hashlib(tmp_path) -> None:
    data = os.urandom(9 * 1024 * 1024 + 123)  # more than one 8 MB chunk
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# Hugging Face Hub cache


def test_hub_cache_in_process(tmp_path, source_model, target_model) -> None:
    checkpoint = tmp_path / "src.safetensors"
    save_file(full_checkpoint(source_model), checkpoint)
    cache = tmp_path / "hub"
    snapshot = make_hub_cache(cache, {"model.safetensors": checkpoint.read_bytes(), "config.json": b"{}"})

    for revision in (None, "main", COMMIT):
        resolved = resolve_checkpoint(revision=revision, cache_dir=cache)
        assert resolved == ResolvedCheckpoint(
            path=snapshot / "model.safetensors", model_id=DEFAULT_MODEL_ID, revision=COMMIT, source="hub"
        )
    assert resolved.path.is_symlink()
    assert sha256_file(resolved.path) == resolved.path.resolve().name

    load_weights(target_model, resolved.path)
    assert_same_weights(target_model, source_model)


def test_hub_cache_falls_back_to_model_pt(tmp_path, source_model) -> None:
    checkpoint = tmp_path / "src.pt"
    torch.save(full_checkpoint(source_model), checkpoint)
    cache = tmp_path / "hub"
    snapshot = make_hub_cache(cache, {"model.pt": checkpoint.read_bytes()})

    resolved = resolve_checkpoint(cache_dir=cache)

    assert resolved.path == snapshot / "model.pt"
    assert resolved.revision == COMMIT
    state_dict, skipped = load_aggregator_state_dict(resolved.path)
    assert len(state_dict) == len(source_model.state_dict())
    assert skipped == len(HEADS)


def test_empty_cache_offline_explains_how_to_get_weights(tmp_path) -> None:
    cache = tmp_path / "empty-hub"
    with pytest.raises(WeightsError) as info:
        resolve_checkpoint(revision="v1", cache_dir=cache)
    message = str(info.value)
    assert "offline mode is on" in message
    assert f"hf download {DEFAULT_MODEL_ID} model.safetensors --revision v1 --cache-dir {cache}" in message
    assert "huggingface-cli download" in message
    # A Python caller reads of its arguments; the command line of its flags (one message, two spellings).
    assert "checkpoint=PATH" in message and "random_weights=True" in message and "--checkpoint" not in message
    spelled = info.value.spelled(command_line_spelling({"model_id": "model"}))
    assert "--checkpoint PATH" in spelled and "--random_weights" in spelled and "checkpoint=" not in spelled
    assert str(cache) in message


def _script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(REPO_ROOT), **extra)
    return env


_USER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vggt.models.config import AggregatorConfig
    from vggt.models.vggt import VGGT
    from vggt.weights import WeightsError, load_weights, resolve_checkpoint

    revision = sys.argv[1] or None
    try:
        resolved = resolve_checkpoint(revision=revision)
    except WeightsError as err:
        print(json.dumps({"error": str(err)}))
        raise SystemExit(0)
    config = AggregatorConfig.from_reference_json(json.load(open(sys.argv[2])))
    report = load_weights(VGGT.from_config(config, heads=False), resolved.path)
    print(json.dumps({
        "path": str(resolved.path), "revision": resolved.revision, "source": resolved.source,
        "loaded": report.loaded, "skipped": report.skipped_heads,
    }))
    """
)


def _run_user_script(env: dict[str, str], revision: str = "") -> dict:
    reference_json = REPO_ROOT / "tests" / "fixtures" / "tiny_vggt_reference.json"
    done = subprocess.run(
        [sys.executable, "-c", _USER_SCRIPT, revision, str(reference_json)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("revision", ["", COMMIT])
def test_hub_cache_from_environment_in_subprocess(tmp_path, source_model, revision) -> None:
    checkpoint = tmp_path / "src.safetensors"
    save_file(full_checkpoint(source_model), checkpoint)
    cache = tmp_path / "custom-hub-cache"
    snapshot = make_hub_cache(cache, {"model.safetensors": checkpoint.read_bytes()})

    result = _run_user_script(_script_env(tmp_path, HF_HUB_CACHE=str(cache)), revision)

    assert result == {
        "path": str(snapshot / "model.safetensors"),
        "revision": COMMIT,
        "source": "hub",
        "loaded": len(source_model.state_dict()),
        "skipped": len(HEADS),
    }


def test_hf_home_cache_in_subprocess(tmp_path, source_model) -> None:
    checkpoint = tmp_path / "src.safetensors"
    save_file(full_checkpoint(source_model), checkpoint)
    snapshot = make_hub_cache(tmp_path / "hf-home" / "hub", {"model.safetensors": checkpoint.read_bytes()})

    result = _run_user_script(_script_env(tmp_path))

    assert result["path"] == str(snapshot / "model.safetensors")
    assert result["revision"] == COMMIT


def test_missing_weights_message_in_subprocess(tmp_path) -> None:
    cache = tmp_path / "empty-cache"
    result = _run_user_script(_script_env(tmp_path, HF_HUB_CACHE=str(cache)))
    message = result["error"]
    assert "hf download facebook/VGGT-1B model.safetensors" in message
    assert "checkpoint=PATH" in message and "random_weights=True" in message
    assert f"Hub cache looked in: {cache}" in message


# --------------------------------------------------------------------------------------------------
# Hub answers that need a network are simulated by replacing hf_hub_download.


def _http_error(cls: type[Exception], message: str) -> Exception:
    return cls(message, response=SimpleNamespace(headers={}, request=None))


def _fake_download(monkeypatch: pytest.MonkeyPatch, answers: dict[str, object]) -> list[str]:
    calls: list[str] = []

    def fake(repo_id: str, filename: str, **kwargs: object) -> str:
        calls.append(filename)
        answer = answers[filename]
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return calls


def test_repository_not_found(monkeypatch) -> None:
    error = _http_error(RepositoryNotFoundError, "404 Client Error: Repository Not Found")
    _fake_download(monkeypatch, {"model.safetensors": error})
    with pytest.raises(WeightsError, match="'someone/missing' was not found"):
        resolve_checkpoint("someone/missing")


def test_revision_not_found(monkeypatch) -> None:
    error = _http_error(RevisionNotFoundError, "404 Client Error: Revision Not Found")
    _fake_download(monkeypatch, {"model.safetensors": error})
    with pytest.raises(WeightsError, match="revision 'nope' was not found in facebook/VGGT-1B"):
        resolve_checkpoint(revision="nope")


def test_repo_without_safetensors_uses_model_pt(monkeypatch, tmp_path) -> None:
    snapshot = tmp_path / "snapshots" / COMMIT
    answers = {"model.safetensors": EntryNotFoundError("no such file"), "model.pt": snapshot / "model.pt"}
    calls = _fake_download(monkeypatch, answers)
    resolved = resolve_checkpoint()
    assert calls == ["model.safetensors", "model.pt"]
    assert resolved.path == snapshot / "model.pt"
    assert resolved.revision == COMMIT


def test_repo_with_neither_file(monkeypatch) -> None:
    missing = EntryNotFoundError("no such file")
    _fake_download(monkeypatch, {"model.safetensors": missing, "model.pt": missing})
    with pytest.raises(WeightsError, match="has neither model.safetensors nor model.pt"):
        resolve_checkpoint("someone/other-model")
