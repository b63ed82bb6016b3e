"""Serving the viewer to others: the path box's folder (--root), binding, logins (--auth), messages that
tell no more of the file system than the user typed, and clean-up when the server is stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from vggt.testing.synthetic import write_synthetic_export
from vggt.viewer import handlers
from vggt.viewer.serving import PathRule, ServingError, check_serving, is_loopback, parse_auth
from vggt.viewer.state import CACHE, Session
from visualize_attn_gradio import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _any_path_again():
    yield
    CACHE.serve(PathRule())


def _message(path: str) -> str:
    """What the message area beside the path box says after Load (its HTML)."""
    return handlers.on_load(Session(), path).message


def test_reachable_viewers_need_a_root_or_an_explicit_any_path() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "myhost.example"))
    assert check_serving("127.0.0.1", False, None, False) == []
    for server_name, share in (("0.0.0.0", False), ("127.0.0.1", True)):
        with pytest.raises(ServingError, match="give --root DIR"):
            check_serving(server_name, share, None, False)
    (warning,) = check_serving("0.0.0.0", False, "/srv/exports", False)
    assert "reachable from the network" in warning and "/srv/exports" in warning
    (warning,) = check_serving("0.0.0.0", True, None, True)
    assert "gradio.live" in warning and "any file" in warning
    assert parse_auth("ann:pa:ss") == ("ann", "pa:ss")
    for bad in ("ann", ":pw", "ann:"):
        with pytest.raises(ServingError):
            parse_auth(bad)


def test_cli_refuses_before_listening(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for args, said in (
        (["--server_name", "0.0.0.0"], "give --root DIR"),
        (["--share"], "give --root DIR"),
        (["--auth", "nopassword"], "takes user:password"),
        (["--root", str(tmp_path / "missing")], "is not a folder"),
        (["--root", str(tmp_path), "--attn_dir", "../elsewhere"], "in the folder this viewer serves"),
    ):
        assert main(args) == 2
        error = capsys.readouterr().err
        assert said in error and error.count("\n") == 1


def test_root_confines_the_path_box(tmp_path: Path) -> None:
    served = tmp_path / "served"
    write_synthetic_export(served / "team" / "kitchen")
    elsewhere = write_synthetic_export(tmp_path / "private" / "mine")
    (served / "link_out").symlink_to(elsewhere)
    (served / "not_an_export").mkdir()
    CACHE.serve(PathRule(served))

    loaded = handlers.on_load(Session(), "team/kitchen")
    assert loaded.message == "" and loaded.session.export_key == str((served / "team/kitchen").resolve())
    refusals = {
        typed: _message(typed)
        for typed in (
            str(elsewhere),
            "../private/mine",
            "link_out",
            "team/missing",
            "/etc",
            "~",
            "/proc/self/cwd",
        )
    }
    for typed, text in refusals.items():
        assert "in the folder this viewer serves" in text, (typed, text)
        assert str(tmp_path) not in text.replace(typed, "")  # neither the root nor where a link leads
    # Outside the root, a missing path and an existing one read the same.
    assert refusals["team/missing"].replace("team/missing", "X") == refusals["/etc"].replace("/etc", "X")
    text = _message("not_an_export")  # inside the root, the reader's word, quoting what was typed
    assert "not_an_export holds no attn_maps/" in text and str(served) not in text


def test_messages_quote_the_path_as_typed(tmp_path: Path) -> None:
    home = str(Path("~").expanduser())
    text = _message("~/no_such_export_here")
    assert "no such file or folder: ~/no_such_export_here" in text and home not in text
    text = _message("/proc/self/cwd/no_such_export_here")
    assert "/proc/self/cwd/no_such_export_here" in text and os.getcwd() not in text.replace(
        "/proc/self/cwd", ""
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, data: dict | None = None) -> int:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return 0  # not listening yet


def test_a_shared_server_asks_for_a_login_warns_and_cleans_up_when_stopped(tmp_path: Path) -> None:
    served = tmp_path / "served"
    export = write_synthetic_export(served / "kitchen")
    archive = served / "kitchen.zip"
    subprocess.run([sys.executable, "-m", "zipfile", "-c", str(archive), str(export)], check=True)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    port = _free_port()
    command = [sys.executable, "visualize_attn_gradio.py", "--attn_dir", "kitchen.zip", "--root", str(served),
               "--server_name", "0.0.0.0", "--server_port", str(port)]  # fmt: skip
    env = dict(os.environ, TMPDIR=str(temporary), PYTHONPATH=str(REPO), VGGT_VIEWER_AUTH="ann:s3cret")
    server = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while (status := _get(f"{base}/config")) not in (200, 401) and time.monotonic() < deadline:
            assert server.poll() is None, server.communicate()
            time.sleep(0.3)
        assert status == 401  # nothing without a login
        assert _get(f"{base}/login", {"username": "ann", "password": "wrong"}) >= 400
        assert _get(f"{base}/login", {"username": "ann", "password": "s3cret"}) == 200
        assert any(p.name.startswith("vggt-attn-zip-") for p in temporary.iterdir())  # --attn_dir's zip
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert "warning: the viewer listens on 0.0.0.0, reachable from the network" in err
    assert not [p for p in temporary.iterdir() if p.name.startswith("vggt-attn-zip-")]
