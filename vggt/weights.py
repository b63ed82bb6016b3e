"""Finding VGGT checkpoints (Hugging Face Hub or local files) and loading their weights.

Only the tensors of the parts a model has are read: a model built without heads (what the attention
exporter uses) reads ``aggregator.*`` alone and never materializes the camera, depth, point and track
heads of a full checkpoint; a full model reads all of them, strictly.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from vggt.arguments import SpelledError, argument
from vggt.wording import plural

DEFAULT_MODEL_ID = "facebook/VGGT-1B"

AGGREGATOR = "aggregator"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "model.pt"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")

_CHUNK_BYTES = 8 * 1024 * 1024
_MAX_LISTED_KEYS = 5
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")

logger = logging.getLogger("vggt")


class WeightsError(SpelledError, RuntimeError):
    """A checkpoint cannot be found or does not fit the model; the message is meant for the user and
    names arguments as the caller spells them (:mod:`vggt.arguments`)."""


def exclusive_sources(checkpoint: str | Path | None, random_weights: bool) -> None:
    """A :class:`WeightsError` when both a checkpoint and random weights are asked for."""
    if checkpoint is not None and random_weights:
        raise WeightsError(
            f"{argument('checkpoint', 'PATH')} and {argument('random_weights', True)} exclude each other"
        )


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where a checkpoint lives on disk and where it came from.

    Attributes
    ----------
    path
        The checkpoint file (``.safetensors`` or a ``torch.save`` file).
    model_id
        Hub repository id, ``None`` for a local file.
    revision
        Commit hash of the hub snapshot the file belongs to, ``None`` for a local file.
    source
        ``"hub"`` or ``"file"``.
    """

    path: Path
    model_id: str | None
    revision: str | None
    source: Literal["hub", "file"]


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_weights` did.

    Attributes
    ----------
    loaded
        Number of tensors loaded into the model.
    skipped_heads
        Number of tensors of the checkpoint that were not read (parts the model was built without).
    path
        The checkpoint file.
    """

    loaded: int
    skipped_heads: int
    path: Path


# --------------------------------------------------------------------------------------------------
# Finding the checkpoint


def resolve_checkpoint(
    model_id: str = DEFAULT_MODEL_ID,
    revision: str | None = None,
    checkpoint: str | Path | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> ResolvedCheckpoint:
    """Find the checkpoint file, downloading it from the Hugging Face Hub if needed.

    Parameters
    ----------
    model_id
        Hub repository id, used when ``checkpoint`` is not given.
    revision
        Branch, tag or commit hash on the hub; the default branch when ``None``.
    checkpoint
        A local ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file, or a folder holding
        ``model.safetensors`` or ``model.pt``. Takes precedence over the hub.
    cache_dir
        Hub cache folder; ``huggingface_hub``'s default (``HF_HUB_CACHE`` / ``HF_HOME``) when ``None``.
    local_files_only
        Look in the hub cache only, never on the network (as ``HF_HUB_OFFLINE=1`` does).

    Returns
    -------
    ResolvedCheckpoint

    Raises
    ------
    WeightsError
        If the local checkpoint does not exist, or the hub cannot provide the file (unknown repository
        or revision, no network and nothing cached, ...).
    """
    if checkpoint is not None:
        return ResolvedCheckpoint(_local_checkpoint_file(checkpoint), None, None, "file")
    path = _download_from_hub(model_id, revision, cache_dir, local_files_only)
    # hf_hub_download returns <cache>/models--org--name/snapshots/<commit>/<file>.
    commit = path.parent.name
    return ResolvedCheckpoint(path, model_id, commit if _COMMIT_RE.fullmatch(commit) else revision, "hub")


def is_local_checkpoint(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` names a local checkpoint rather than a hub repository id: it exists, or
    it is written as a path (absolute, ``./``, ``~``, or a checkpoint file suffix)."""
    text = str(name_or_path)
    return (
        isinstance(name_or_path, Path)
        or Path(text).expanduser().exists()
        or text.startswith((".", "/", "~"))
        or text.endswith((".safetensors", *TORCH_SUFFIXES))
    )


def _local_checkpoint_file(checkpoint: str | Path) -> Path:
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise WeightsError(f"checkpoint not found: {path}")
    if path.is_dir():
        for name in (SAFETENSORS_NAME, PICKLE_NAME):
            if (path / name).is_file():
                return path / name
        raise WeightsError(
            f"checkpoint folder {path} holds neither {SAFETENSORS_NAME} nor {PICKLE_NAME}; "
            f"pass the checkpoint file itself with {argument('checkpoint', 'PATH')}"
        )
    return path


def _download_from_hub(
    model_id: str, revision: str | None, cache_dir: str | Path | None, local_files_only: bool = False
) -> Path:
    # Imported here so that loading local files works even where huggingface_hub is broken.
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at_revision = f" at revision {revision!r}" if revision else ""
    unreachable = local_files_only
    for filename in (SAFETENSORS_NAME, PICKLE_NAME):
        try:
            # Once the hub proved unreachable, only look in the cache (no second round of retries).
            return Path(
                hf_hub_download(
                    model_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=unreachable
                )
            )
        except GatedRepoError as err:
            raise WeightsError(
                f"{model_id} is a gated repository on the Hugging Face Hub: accept its terms on "
                f"https://huggingface.co/{model_id}, then log in with `hf auth login` "
                "(or set HF_TOKEN).\n"
                f"Hub said: {_first_line(err)}"
            ) from err
        except RepositoryNotFoundError as err:
            raise WeightsError(
                f"model repository {model_id!r} was not found on the Hugging Face Hub "
                "(check the name; private repositories need `hf auth login` or HF_TOKEN).\n"
                f"Hub said: {_first_line(err)}"
            ) from err
        except RevisionNotFoundError as err:
            raise WeightsError(
                f"revision {revision!r} was not found in {model_id} on the Hugging Face Hub.\n"
                f"Hub said: {_first_line(err)}"
            ) from err
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError):
            # Not cached and the hub is out of reach: the other file name may still be cached.
            unreachable = True
        except EntryNotFoundError:
            # The repository exists but has no file by this name: try the next one.
            pass
        except HfHubHTTPError as err:
            raise WeightsError(
                f"downloading {filename} from {model_id}{at_revision} failed: {_first_line(err)}"
            ) from err

    if not unreachable:
        raise WeightsError(
            f"{model_id}{at_revision} on the Hugging Face Hub has neither {SAFETENSORS_NAME} nor "
            f"{PICKLE_NAME}; pass a checkpoint file with {argument('checkpoint', 'PATH')}"
        )
    hub_cache = Path(cache_dir).expanduser() if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    if constants.HF_HUB_OFFLINE:
        why = "offline mode is on (HF_HUB_OFFLINE=1)"
    elif local_files_only:
        why = "only local files were asked for (local_files_only)"
    else:
        why = "the Hugging Face Hub could not be reached"
    options = ""
    if revision:
        options += f" --revision {revision}"
    if cache_dir is not None:
        options += f" --cache-dir {hub_cache}"
    command = f"download {model_id} {SAFETENSORS_NAME}{options}"
    raise WeightsError(
        f"the weights of {model_id}{at_revision} are not available: {why} "
        "and they are not in the local Hugging Face cache.\n"
        "Get them in one of these ways:\n"
        f"  * download them once while online (about 5 GB for VGGT-1B):\n"
        f"        hf {command}\n"
        f"    (with an older huggingface_hub: huggingface-cli {command})\n"
        f"  * or pass a checkpoint you already have with {argument('checkpoint', 'PATH')}\n"
        f"    (a .safetensors or .pt file, or a folder holding {SAFETENSORS_NAME} or {PICKLE_NAME})\n"
        f"  * or try the toolkit without them: {argument('random_weights', True)} (seeded random weights)\n"
        f"Hub cache looked in: {hub_cache} (set HF_HOME or HF_HUB_CACHE to use another one)"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 8 MB chunks.

    Parameters
    ----------
    path
        File to hash.

    Returns
    -------
    str
        Lower-case hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Reading tensors


def load_aggregator_state_dict(path: Path, dtype: torch.dtype | None = None) -> tuple[dict[str, Tensor], int]:
    """Read the ``aggregator.*`` tensors of a checkpoint (see :func:`load_state_dict`).

    Parameters
    ----------
    path
        A ``.safetensors`` file or a ``torch.save`` file (plain state dict, or wrapped in
        ``{"model": ...}`` / ``{"state_dict": ...}``, keys optionally prefixed with ``module.``).
    dtype
        If given, floating-point tensors are cast to it one by one as they are read.

    Returns
    -------
    state_dict
        The aggregator tensors on CPU, keys keep their ``aggregator.`` prefix.
    skipped
        Number of other (head) tensors in the checkpoint, which were not read.

    Raises
    ------
    WeightsError
        If the file is missing, is neither format, or holds pickled objects other than tensors.
    """
    return load_state_dict(path, (AGGREGATOR,), dtype)


def load_state_dict(
    path: Path, parts: tuple[str, ...], dtype: torch.dtype | None = None
) -> tuple[dict[str, Tensor], int]:
    """Read the tensors of some parts of a checkpoint.

    Parameters
    ----------
    path
        A ``.safetensors`` file or a ``torch.save`` file (plain state dict, or wrapped in
        ``{"model": ...}`` / ``{"state_dict": ...}``, keys optionally prefixed with ``module.``).
    parts
        Top-level module names whose tensors are read, e.g. ``("aggregator", "camera_head")``.
    dtype
        If given, floating-point tensors are cast to it one by one as they are read.

    Returns
    -------
    state_dict
        The tensors on CPU under their full names (``aggregator.patch_embed...``).
    skipped
        Number of other tensors in the checkpoint, which were not read.

    Raises
    ------
    WeightsError
        If the file is missing, is neither format, or holds pickled objects other than tensors.
    """
    state_dict, skipped = _read_parts(Path(path), parts, dtype)
    return state_dict, len(skipped)


def _read_parts(
    path: Path, parts: tuple[str, ...], dtype: torch.dtype | None
) -> tuple[dict[str, Tensor], list[str]]:
    """Like :func:`load_state_dict`, but returns the skipped key names."""
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    prefixes = tuple(f"{part}." for part in parts)
    if _looks_like_safetensors(path):
        return _read_safetensors(path, prefixes, dtype)
    return _read_torch_pickle(path, prefixes, dtype)


def _looks_like_safetensors(path: Path) -> bool:
    # A safetensors file starts with the little-endian u64 length of a JSON header, then "{".
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= path.stat().st_size - 8


def _read_safetensors(
    path: Path, prefixes: tuple[str, ...], dtype: torch.dtype | None
) -> tuple[dict[str, Tensor], list[str]]:
    from safetensors import SafetensorError, safe_open

    state_dict: dict[str, Tensor] = {}
    skipped: list[str] = []
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if key.startswith(prefixes):
                    state_dict[key] = _cast(handle.get_tensor(key), dtype)
                else:
                    skipped.append(key)
    except SafetensorError as err:
        raise WeightsError(f"cannot read safetensors checkpoint {path}: {err}") from err
    return state_dict, skipped


def _read_torch_pickle(
    path: Path, prefixes: tuple[str, ...], dtype: torch.dtype | None
) -> tuple[dict[str, Tensor], list[str]]:
    # mmap keeps the (up to 5 GB) file on disk instead of in RAM; only zip-format files support it.
    mmap = zipfile.is_zipfile(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # weights_only rejects the first non-tensor global it meets, before anything is constructed.
        text = str(err).lower()
        if "weights only" in text and ("unsupported global" in text or "unsupported class" in text):
            raise WeightsError(
                f"refusing to load {path}: it holds pickled Python objects that are not tensors, and "
                "unpickling them could run arbitrary code. Use a safetensors checkpoint or a file that "
                "holds only a state dict."
            ) from err
        raise _not_a_checkpoint(path, err) from err
    except Exception as err:  # torch.load fails on foreign files with many exception types
        raise _not_a_checkpoint(path, err) from err

    entries = _unwrap_state_dict(loaded, path)
    state_dict: dict[str, Tensor] = {}
    skipped: list[str] = []
    for raw_key, value in entries.items():
        key = raw_key.removeprefix("module.")
        if not key.startswith(prefixes):
            skipped.append(key)
            continue
        if not isinstance(value, Tensor):
            raise WeightsError(f"checkpoint {path}: {key} is a {type(value).__name__}, not a tensor")
        state_dict[key] = _cast(value, dtype)
    return state_dict, skipped


def _unwrap_state_dict(loaded: object, path: Path) -> Mapping[str, object]:
    if isinstance(loaded, Mapping) and not any(isinstance(v, Tensor) for v in loaded.values()):
        for wrapper in ("model", "state_dict"):
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(k, str) for k in loaded):
        raise WeightsError(
            f"checkpoint {path} is not a state dict (a mapping from parameter names to tensors), "
            f"it holds a {type(loaded).__name__}"
        )
    return loaded


def _not_a_checkpoint(path: Path, err: BaseException) -> WeightsError:
    return WeightsError(
        f"cannot read checkpoint {path}: it is neither a safetensors file nor a PyTorch file saved "
        f"with torch.save ({_first_line(err)})"
    )


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


# --------------------------------------------------------------------------------------------------
# Loading into a model


def load_weights(model: nn.Module, path: Path, dtype: torch.dtype | None = None) -> LoadReport:
    """Load the weights of a checkpoint into ``model``, strictly, reading only the parts it has.

    The parts are the top-level modules of ``model``'s state dict (``aggregator``, and each head it was
    built with); the checkpoint's other tensors are not read.

    If any parameter or buffer of ``model`` is on the ``meta`` device (a model built without
    allocating memory), the checkpoint tensors are assigned to the model as they are
    (``load_state_dict(assign=True)``), so weights are held in memory once, on CPU. Otherwise they
    are copied into the existing tensors, which keep their device.

    Parameters
    ----------
    model
        A model whose ``state_dict()`` keys are upstream's names (``aggregator.*``, ``camera_head.*``, ...).
    path
        Checkpoint file, see :func:`load_state_dict`.
    dtype
        If given, floating-point weights are read in this dtype and the model's floating-point
        parameters and buffers end up in it.

    Returns
    -------
    LoadReport

    Raises
    ------
    WeightsError
        If the checkpoint cannot be read, lacks one of the model's parts, or its keys or shapes differ
        from the model's (missing keys, unexpected keys, shape mismatches).
    """
    path = Path(path)
    expected = model.state_dict()
    parts = tuple(dict.fromkeys(key.split(".", 1)[0] for key in expected))
    state_dict, skipped = _read_parts(path, parts, dtype)
    absent = [part for part in parts if not any(key.startswith(f"{part}.") for key in state_dict)]
    if absent:
        example = f" (it has {', '.join(skipped[:_MAX_LISTED_KEYS])}, ...)" if skipped else ""
        held = " or ".join(f"{part}.*" for part in absent)
        hint = "" if absent == [AGGREGATOR] else "; build the model without those heads"
        raise WeightsError(f"checkpoint {path} holds no {held} tensors{example}{hint}")

    _check_matches(path, state_dict, expected)

    on_meta = any(t.is_meta for t in expected.values())
    if not on_meta and dtype is not None:
        model.to(dtype)
    model.load_state_dict(state_dict, strict=True, assign=on_meta)
    if on_meta:
        still_meta = [name for name, t in _named_tensors(model) if t.is_meta]
        if still_meta:
            raise WeightsError(
                "the model still has tensors on the meta device after loading (they are not saved in "
                f"checkpoints, create them on a real device): {_list_keys(still_meta)}"
            )

    logger.info(
        "loaded %s %s tensors from %s%s",
        f"{len(state_dict):,}",
        " + ".join(parts),
        path.name,
        _skipped_summary(skipped),
    )
    return LoadReport(loaded=len(state_dict), skipped_heads=len(skipped), path=path)


def _check_matches(path: Path, state_dict: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{plural(len(missing), 'missing key')} ({_list_keys(missing)})")
    if unexpected:
        problems.append(f"{plural(len(unexpected), 'unexpected key')} ({_list_keys(unexpected)})")
    if mismatched:
        problems.append(f"{plural(len(mismatched), 'shape mismatch', 'es')} ({_list_keys(mismatched)})")
    if problems:
        raise WeightsError(
            f"checkpoint {path} does not match the model: "
            + "; ".join(problems)
            + "\nIs it a VGGT checkpoint, and was the model built with the matching configuration?"
        )


def _named_tensors(model: nn.Module) -> Iterable[tuple[str, Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    return shown + (", ..." if len(keys) > _MAX_LISTED_KEYS else "")


def _skipped_summary(skipped: list[str]) -> str:
    if not skipped:
        return ""
    groups = sorted({key.split(".", 1)[0] for key in skipped})
    return f"; skipped {plural(len(skipped), 'head tensor')} ({', '.join(groups)})"


def init_random_weights(model: nn.Module, seed: int = 0, device: str | torch.device = "cpu") -> None:
    """Give every parameter of ``model`` (typically built on ``meta``) seeded random values, in place.

    Linear, convolution and patch-embedding weights, tokens and position embeddings are drawn from
    N(0, 0.02^2); biases are zero, LayerNorm and GroupNorm weights one, LayerScale ``gamma`` keeps the
    value its config gives.
    The same seed gives the same weights on every machine (drawn on CPU, then moved to ``device``).

    Parameters
    ----------
    model : nn.Module
        A :class:`vggt.models.vggt.VGGT` or anything with the same parameter naming.
    seed : int
        Seed of the generator; recorded in an export's manifest.
    device : str or torch.device
        Where the weights end up.
    """
    generator = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            full_name = f"{module_name}.{name}" if module_name else name
            value = torch.empty(param.shape, dtype=torch.float32)
            if name == "gamma":
                value.fill_(_layer_scale_init(config, full_name))
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                value.fill_(1.0 if name == "weight" else 0.0)
            elif name.endswith("bias"):
                value.zero_()
            else:
                value.normal_(0.0, 0.02, generator=generator)
            module._parameters[name] = nn.Parameter(value.to(device), requires_grad=param.requires_grad)
    model.to(device)


def _layer_scale_init(config, name: str) -> float:
    """The initial LayerScale value of parameter ``name`` in a model of ``config``."""
    aggregator = getattr(config, "aggregator", config)  # a VGGTConfig, or an AggregatorConfig
    if name.startswith("camera_head."):
        return config.camera_head.init_values
    if ".patch_embed." in f".{name}":
        return getattr(getattr(aggregator, "patch_embed", None), "init_values", 1.0)
    init = getattr(aggregator, "init_values", None)
    return 1.0 if init is None else init


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 of a checkpoint, free for files of the hub cache.

    huggingface_hub stores a large file as ``blobs/<sha256>`` with the snapshot entry a link to it,
    so the digest of a cached checkpoint is its blob's name; other files are hashed.
    """
    target = Path(path).resolve()
    if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    return sha256_file(target)


def assign_weights(
    model: nn.Module,
    model_id: str = DEFAULT_MODEL_ID,
    revision: str | None = None,
    checkpoint: str | Path | None = None,
    cache_dir: str | Path | None = None,
    random_weights: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    local_files_only: bool = False,
) -> dict:
    """Give a model (typically built on ``meta``) its weights on ``device``, in eval mode.

    Parameters
    ----------
    model : nn.Module
        A :class:`vggt.models.vggt.VGGT`.
    model_id, revision, checkpoint, cache_dir, local_files_only
        Where the weights come from, see :func:`resolve_checkpoint`.
    random_weights : bool
        Seeded random weights instead (see :func:`init_random_weights`): nothing is read.
    seed : int
        Seed of the random weights.
    device : str or torch.device

    Returns
    -------
    dict
        Where the weights came from, as an export's manifest records it: ``id``, ``revision``,
        ``checkpoint_file``, ``checkpoint_sha256``, ``random_weights``, ``random_seed``. Also stored as
        ``model.weights_source``, which :func:`vggt.export.export_attention` picks up.
    """
    if random_weights:
        init_random_weights(model, seed, device)
        source = {"id": None, "revision": None, "checkpoint_file": None, "checkpoint_sha256": None}
    else:
        resolved = resolve_checkpoint(model_id, revision, checkpoint, cache_dir, local_files_only)
        load_weights(model, resolved.path)
        model.to(device)
        source = {
            "id": resolved.model_id,
            "revision": resolved.revision,
            "checkpoint_file": resolved.path.name,
            "checkpoint_sha256": checkpoint_sha256(resolved.path),
        }
    source |= {"random_weights": random_weights, "random_seed": seed if random_weights else None}
    model.eval().requires_grad_(False)
    model.weights_source = source
    return source
