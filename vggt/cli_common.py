"""What the command lines of the top-level scripts share: one-line errors, the image flags (which images,
in which order, preprocessed how), the weights flags (where the weights come from, on which device) and
the entry-point wrapper that turns user errors into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vggt.arguments import EXIT_USAGE, SpelledError, UsageError, command_line_spelling
from vggt.attn_format import FormatError
from vggt.device import DeviceError, select_device_and_dtype
from vggt.geometry.correspondence import is_scene_dir, scene_of_image_dir
from vggt.models.config import VGGTConfig
from vggt.models.vggt import VGGT
from vggt.preprocess import ImageLoadError, list_images
from vggt.weights import DEFAULT_MODEL_ID, WeightsError, assign_weights, exclusive_sources, resolve_checkpoint

EXIT_INTERRUPTED = 130
DEFAULT_IMAGE_SET = "synthetic_room"
# The package's commands: the console command ``pip install`` puts beside the interpreter (see
# pyproject.toml's [project.scripts]), the top-level script of a clone, the module ``python -m`` runs.
COMMANDS = {
    "export": ("vggt-attn-export", "compute_layerwise_attentions.py", "vggt.export_cli"),
    "view": ("vggt-attn-view", "visualize_attn_gradio.py", "vggt.viewer"),
    "analyze": ("vggt-attn-analyze", "analyze_attention.py", "vggt.analysis.cli"),
    "intervene": ("vggt-attn-intervene", "intervene_attention.py", "vggt.intervene_cli"),
    "figure": ("vggt-attn-figure", "attention_figure.py", "vggt.viewer.figures"),
}

log = logging.getLogger("vggt")


FlagAdder = Callable[..., None]


def flag_adder(parser: argparse.ArgumentParser) -> FlagAdder:
    """``add(name, **kwargs)``: a flag spelled ``--name`` and, for names with ``_``, ``--na-me`` too."""

    def add(name: str, **kwargs) -> None:
        spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        parser.add_argument(*spellings, dest=name, **kwargs)

    return add


def add_image_flags(add: FlagAdder) -> None:
    """The flags choosing the frames: ``--image_set_name``, ``--image_dir``, ``--num_images``,
    ``--image_extension``, ``--first_image_idx``, ``--preprocess``."""
    add("image_set_name", default=DEFAULT_IMAGE_SET, help="name of the image set (default %(default)s)")
    add("image_dir", help="folder of images (default examples/<image_set_name>/images)")
    add(
        "num_images",
        type=int,
        help="use this many images, evenly spaced over the sorted folder (default: all)",
    )
    add("image_extension", help="only files with this extension, e.g. png (default: common image types)")
    add(
        "first_image_idx",
        type=int,
        default=0,
        help="which chosen image becomes frame 0, the query frame (default %(default)s)",
    )
    add(
        "preprocess",
        choices=("crop", "pad"),
        default="crop",
        help="upstream preprocessing mode (default %(default)s)",
    )


def add_weights_flags(add: FlagAdder) -> None:
    """The flags giving the model its weights and device: ``--model``, ``--revision``, ``--checkpoint``,
    ``--cache_dir``, ``--random_weights``, ``--seed``, ``--model_config``, ``--device``, ``--dtype``."""
    add("model", default=DEFAULT_MODEL_ID, help="Hugging Face repo id of the weights (default %(default)s)")
    add("revision", help="branch, tag or commit of --model")
    add("checkpoint", help="local .safetensors/.pt file or folder instead of the hub")
    add("cache_dir", help="Hugging Face cache folder (default: HF_HUB_CACHE / HF_HOME)")
    add("random_weights", action="store_true", help="seeded random weights, no download (for trying things)")
    add("seed", type=int, default=0, help="seed of --random_weights (default %(default)s)")
    add(
        "model_config",
        help="JSON architecture (VGGTConfig, or AggregatorConfig fields) for a model other than VGGT-1B",
    )
    add("device", default="auto", help="cpu, cuda, cuda:N or auto (default %(default)s)")
    add(
        "dtype",
        default="auto",
        help="autocast dtype: auto, float32, bfloat16 or float16 (default %(default)s)",
    )


@dataclass(frozen=True)
class ImageChoice:
    """The frames of a run in model order and where they came from."""

    paths: list[Path]  # model order: frame 0 first
    folder_size: int
    first_image_idx: int


def image_folder(args: argparse.Namespace) -> Path:
    """``--image_dir``, or ``examples/<image_set_name>/images``."""
    return Path(args.image_dir) if args.image_dir else Path("examples") / args.image_set_name / "images"


def choose_images(
    image_dir: Path, extension: str | None, num_images: int | None, first_image_idx: int
) -> ImageChoice:
    """Pick ``num_images`` evenly spaced images of the sorted folder and put ``first_image_idx`` first.

    The chosen image at position ``first_image_idx`` becomes frame 0; the others keep their order.
    """
    try:
        available = list_images(image_dir, extension)
    except NotADirectoryError:
        raise UsageError(f"image folder not found: {image_dir}") from None
    kind = f"*.{extension.lstrip('.')}" if extension else "image"
    if not available:
        raise UsageError(f"no {kind} files found in {image_dir}")
    count = len(available) if num_images is None else num_images
    if count < 1:
        raise UsageError(f"--num_images must be at least 1, got {count}")
    if count > len(available):
        raise UsageError(f"--num_images {count} but {image_dir} holds only {len(available)} {kind} files")
    if count == 1:
        chosen = [available[0]]
    else:
        chosen = [available[round(i * (len(available) - 1) / (count - 1))] for i in range(count)]
    if not 0 <= first_image_idx < count:
        raise UsageError(
            f"--first_image_idx {first_image_idx} is out of range for {count} images (0-{count - 1})"
        )
    ordered = [chosen[first_image_idx]] + chosen[:first_image_idx] + chosen[first_image_idx + 1 :]
    return ImageChoice(ordered, len(available), first_image_idx)


def choose_images_from_flags(args: argparse.Namespace) -> ImageChoice:
    """:func:`choose_images` with the image flags."""
    return choose_images(image_folder(args), args.image_extension, args.num_images, args.first_image_idx)


def add_output_flags(add: FlagAdder, default_prefix: str) -> None:
    """The flags naming the output folder: ``--output_dir_prefix``, ``--output_dir``, ``--overwrite``."""
    add(
        "output_dir_prefix",
        default=default_prefix,
        help="output folder is <prefix><image_set_name> (default %(default)s)",
    )
    add("output_dir", help="output folder (overrides --output_dir_prefix)")
    add("overwrite", action="store_true", help="replace an existing output folder")


def output_folder(args: argparse.Namespace) -> Path:
    """The folder :func:`add_output_flags`' flags name."""
    if args.output_dir:
        return Path(args.output_dir)
    return Path(f"{args.output_dir_prefix}{args.image_set_name}")


def check_output_free(out_dir: Path, overwrite: bool) -> None:
    """A user error when ``out_dir`` exists and may not be replaced."""
    if out_dir.exists() and not overwrite:
        raise UsageError(f"output folder {out_dir} already exists (use --overwrite to replace it)")


def scene_folder(args: argparse.Namespace) -> Path | None:
    """The scene with the frames' true geometry: ``--scene``, or the image folder's parent when that is a
    scene folder (``cameras.json`` and ``depth/``), else ``None``."""
    if args.scene is None:
        return scene_of_image_dir(image_folder(args))
    if not is_scene_dir(args.scene):
        raise UsageError(f"--scene {args.scene} is not a scene folder (it needs cameras.json and depth/)")
    return Path(args.scene)


def model_config(args: argparse.Namespace) -> VGGTConfig:
    """The architecture: ``--model_config``'s JSON, or VGGT-1B's."""
    path = args.model_config
    if path is None:
        return VGGTConfig.vggt_1b()
    try:
        return VGGTConfig.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"cannot read --model_config {path}: {err}") from None


def check_weights_flags(args: argparse.Namespace) -> None:
    """Flags that cannot work, named before anything is loaded (a missing local checkpoint, say)."""
    exclusive_sources(args.checkpoint, args.random_weights)
    if args.checkpoint:
        resolve_checkpoint(checkpoint=args.checkpoint)


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype | None]:
    """``--device`` and ``--dtype`` resolved (see :func:`vggt.device.select_device_and_dtype`)."""
    return select_device_and_dtype(args.device, args.dtype)


def load_weights(args: argparse.Namespace, model: VGGT, device: torch.device, progress: bool) -> dict:
    """Give the (meta) model its weights on ``device``; returns the ``model`` fields of a manifest."""
    source = "random weights" if args.random_weights else args.checkpoint or args.model
    with tqdm(total=1, desc=f"loading model ({source})", unit="step", disable=not progress) as bar:
        fields = assign_weights(
            model, args.model, args.revision, args.checkpoint, args.cache_dir, args.random_weights, args.seed,
            device,
        )  # fmt: skip
        bar.update(1)
    architecture = "VGGT-1B" if args.model_config is None else model.config.aggregator.to_dict()
    return fields | {"architecture": architecture}


def weights_description(args: argparse.Namespace) -> str:
    """Where the weights come from, for a plan printout."""
    if args.random_weights:
        return f"random (seed {args.seed})"
    return args.checkpoint or f"{args.model}" + (f" @ {args.revision}" if args.revision else "")


class _ProgressFriendlyHandler(logging.Handler):
    """Log lines printed above the progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def run_command(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], object],
    argv: list[str] | None,
    errors: tuple[type[BaseException], ...] = (),
    renamed_flags: Mapping[str, str] | None = None,
) -> int:
    """Parse ``argv`` and ``run`` it; returns the exit code.

    User errors (:class:`UsageError`, weights, images and format errors, and ``errors``) print one line
    and give 2; an ``OSError`` (a full disk, say) gives 1; Ctrl-C gives 130. ``renamed_flags`` maps the
    Python names of arguments that error messages name to flag names where they differ.
    """
    if not log.handlers:  # this package's messages only; libraries keep their own logging as it is
        handler = _ProgressFriendlyHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    spelling = command_line_spelling({"model_id": "model", **(renamed_flags or {})})
    try:
        run(parser.parse_args(argv))
    except (UsageError, WeightsError, DeviceError, ImageLoadError, FormatError, *errors) as err:
        message = err.spelled(spelling) if isinstance(err, SpelledError) else str(err)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def shell_command(command: str, *args: str) -> str:
    """How to run one of :data:`COMMANDS` in the shell that started this process, as a line to print.

    Its console command where ``pip install`` put it beside this interpreter (by name when the shell
    finds it so, else by path), else this interpreter (``python`` when the shell's ``python`` is it) with
    the top-level script of the clone this package runs from, else with ``-m`` and the module.
    """
    console, script, module = COMMANDS[command]
    quoted = " ".join(shlex.quote(arg) for arg in args)
    installed = Path(sys.executable).parent / console
    if installed.is_file():
        found = shutil.which(console)
        program = console if found and os.path.samefile(found, installed) else _shown_path(installed)
        return f"{program} {quoted}"
    found = shutil.which("python")
    python = (
        "python" if found and os.path.samefile(found, sys.executable) else _shown_path(Path(sys.executable))
    )
    clone_script = Path(__file__).resolve().parents[1] / script
    if clone_script.is_file():
        return f"{python} {_shown_path(clone_script)} {quoted}"
    return f"{python} -m {module} {quoted}"


def _shown_path(path: Path) -> str:
    """``path`` relative to the working folder when it lies inside it, else absolute; quoted for a shell."""
    absolute = path.absolute()
    try:
        return shlex.quote(str(absolute.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(absolute))
