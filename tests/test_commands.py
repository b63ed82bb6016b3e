"""The commands: console commands installed by ``pip install`` (pyproject's [project.scripts]) beside the
top-level scripts, and the exporter's closing hint, which must work as printed in the shell that ran it."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from vggt.cli_common import COMMANDS

REPO = Path(__file__).resolve().parents[1]


def test_every_command_is_a_console_command_and_a_script_of_the_clone() -> None:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11's TOML reader")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {console for console, _, _ in COMMANDS.values()}
    for console, script, module in COMMANDS.values():
        target = scripts[console]
        module_name, function = target.split(":")
        # The console command, the clone's script and ``python -m`` run the same function.
        assert f"from {module_name} import main" in (REPO / script).read_text() and function == "main"
        assert module == module_name or module == module_name.rsplit(".", 1)[0]


def _hint(stdout: str) -> list[str]:
    lines = stdout.strip().splitlines()
    assert lines[-2].endswith("View it with:"), stdout
    return shlex.split(lines[-1])


def _tiny_export_args(tiny_model_files, images: Path, out: str) -> list[str]:
    return ["--checkpoint", str(tiny_model_files.checkpoint), "--model_config", str(tiny_model_files.config),
            "--image_dir", str(images), "--num_images", "2", "--output_dir", out]  # fmt: skip


@pytest.fixture()
def two_images(tmp_path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((REPO / "examples" / "synthetic_room" / "images").glob("*.png"))[:2]:
        shutil.copy(path, images / path.name)
    return images


def test_closing_hint_of_the_clones_script_works_as_printed(tiny_model_files, two_images, tmp_path) -> None:
    """``python compute_layerwise_attentions.py ...`` from a clone: the hint runs the installed console
    command where pip put one beside this interpreter, else the clone's viewer script with this
    interpreter; run as printed (with ``--help``, so that no server starts), it works."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, str(REPO / "compute_layerwise_attentions.py"),
         *_tiny_export_args(tiny_model_files, two_images, "my export")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    hint = _hint(run.stdout)
    assert hint[-2:] == ["--attn_dir", "my export"] and (tmp_path / hint[-1] / "attn_maps").is_dir()
    console, script, _ = COMMANDS["view"]
    if (Path(sys.executable).parent / console).is_file():  # the package is installed beside the interpreter
        assert Path(hint[0]).name == console
    else:
        assert Path(hint[1]).name == script
    shown = subprocess.run(hint + ["--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert shown.returncode == 0 and "--attn_dir" in shown.stdout, shown.stderr


@pytest.mark.skipif(sys.version_info < (3, 11), reason="pip's --python option and tomllib")
def test_pip_install_puts_the_console_commands_in_place(tiny_model_files, two_images, tmp_path) -> None:
    """A real install (a wheel of this checkout, no dependencies: they come from this interpreter's
    site-packages) into a fresh virtual environment: every command answers ``--help``, and an export made
    with ``vggt-attn-export`` ends with a hint naming ``vggt-attn-view``, which works as printed."""
    pytest.importorskip("setuptools", reason="building the wheel without network needs setuptools")
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copy(REPO / "README.md", source)
    shutil.copytree(REPO / "vggt", source / "vggt", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    offline = ["--no-deps", "--no-index"]
    dist = tmp_path / "dist"
    build = [*pip, "wheel", *offline, "--no-build-isolation", "-w", str(dist), str(source)]
    subprocess.run(build, check=True, cwd=tmp_path, timeout=300)
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    wheel = next(dist.glob("vggt_attn-*.whl"))
    subprocess.run([*pip, "--python", str(python), "install", *offline, str(wheel)], check=True, cwd=tmp_path,
                   timeout=300)  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PATH"] = f"{environment / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]  # the dependencies, not this checkout
    for console, _, _ in COMMANDS.values():
        shown = subprocess.run([console, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300)  # fmt: skip
        assert shown.returncode == 0, (console, shown.stderr)
        assert shown.stdout.startswith(f"usage: {console}"), shown.stdout[:200]
    run = subprocess.run(["vggt-attn-export", *_tiny_export_args(tiny_model_files, two_images, "out")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    hint = _hint(run.stdout)
    assert hint == ["vggt-attn-view", "--attn_dir", "out"]
    shown = subprocess.run(hint + ["--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
