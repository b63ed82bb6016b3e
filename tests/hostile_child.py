"""Runs the hostile corpus in a child process:
``python -m tests.hostile_child CASES.json RESULTS.json reader|viewer``.

The child limits its own address space to what it had after start-up plus :data:`EXTRA_ADDRESS_SPACE`,
records every file it opens (Python's audit hook), and after each case records the bytes under its
temporary folder (``TMPDIR``, private to it: the parent checks it is empty once the child has exited)
before and after the case's export is closed. ``reader``: each case is opened as the viewer opens an
export, then every layer, head, query row, reverse view and frame it offers is read. ``viewer``: each
case goes through the viewer's Gradio handlers as a browser session would use them, then malformed
clicks and control values are sent.
"""

from __future__ import annotations

import gc
import html
import json
import os
import re
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.hostile_exports import VIEW, Case, read_cases

EXTRA_ADDRESS_SPACE = 1 << 30


def address_space() -> int:
    """Bytes of virtual memory this process maps now (``VmSize``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def limit_address_space(extra: int = EXTRA_ADDRESS_SPACE) -> int:
    limit = address_space() + extra
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


class OpenedFiles:
    """Paths of the files opened while :attr:`active` (every ``open`` audit event)."""

    def __init__(self) -> None:
        self.active = False
        self.paths: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.active and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            self.paths.append(os.fsdecode(os.fspath(args[0])))


def folder_usage(folder: Path) -> tuple[int, list[str]]:
    """Bytes of the files under ``folder`` and the paths of everything there."""
    total, entries = 0, []
    for path in sorted(folder.rglob("*")):
        entries.append(str(path.relative_to(folder)))
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total, entries


def outside_opens(case: Case, corpus: Path, opened: list[str], temporary: Path) -> list[str]:
    """Opened files that lie outside the case's export: in the corpus (the decoys and the other cases),
    or system files an export may link to."""
    bound = Path(case.bound).resolve()
    bad = []
    for raw in opened:
        if "\x00" in raw:
            bad.append(repr(raw))
            continue
        real = Path(os.path.realpath(raw))
        if real == bound or bound in real.parents or temporary in real.parents:
            continue
        if corpus in real.parents or str(real).startswith(("/etc/", "/proc/", "/dev/")):
            bad.append(str(real))
    return bad


def view_with_reader(case: Case, temporary: Path, result: dict) -> list[str]:
    """Open the case as the viewer would and read everything it offers; returns the strings shown.
    ``result["temporary_bytes"]`` is what the temporary folder held before the export was closed."""
    from vggt.attn_format import open_export

    export = open_export(case.path)
    try:
        export.validate()
        shown = [str(export.manifest.get("image_set_name")), *export.frame_sources, *export.layer_names]
        shown.append(json.dumps(export.manifest.get("model"), ensure_ascii=False))
        for name in export.layer_names:
            meta = export.layer_meta(name)
            shown.extend(meta["special_tokens"])
            heads = [None, *range(meta["num_heads"] if meta["per_head_data"] else 0)]
            for head in heads:
                for qi in (0, meta["Q"] - 1):
                    export.query_maps(name, qi, head)
                export.key_maps(name, meta["key_frames"][-1], meta["H_ds"] - 1, meta["W_ds"] - 1, head)
                for row in range(len(meta["token_queries"])):
                    export.token_maps(name, row, head)
            export.special_mass(name)
            export.token_special_mass(name)
        for index in range(len(export.frame_paths)):
            export.frame(index)
        if case.name.startswith(ANALYSIS_CASES):
            from vggt.analysis.store import analysis_for

            analysis_for(export, save=False)  # read back when whole and this export's, else computed
        geometry = export.geometry()
        if geometry is not None:
            for key in ("extrinsic", "intrinsic", "depth", "depth_conf", "world_points", "query_points"):
                geometry.array(key)
            for source in geometry.sources:
                geometry.correspondence(source)
        shown.extend(export.warnings)
        return shown
    finally:
        result["temporary_bytes"] = folder_usage(temporary)[0]
        export.close()


class _Event:
    """What Gradio hands a ``.select`` handler (``evt._data``), as the page may send it."""

    def __init__(self, data: object) -> None:
        self._data = data


# Click data a page (or anyone posting to the server) may send; each must end as a message or a view.
MALFORMED_CLICKS = [
    None, "x", 3, [], {}, {"x": None, "y": 1}, {"x": "a", "y": "b"}, {"x": float("nan"), "y": 0},
    {"x": float("inf"), "y": 0}, {"x": 1e308, "y": -1e308}, {"x": 10**400, "y": 0}, {"x": [1], "y": [2]},
    {"x": True, "y": False}, {"layer": None}, {"layer": {"a": 1}, "head": "x"},
    {"layer": "layer_01", "head": 1.5}, {"layer": "layer_01", "head": 10**30},
    {"layer": "layer_01", "head": -1}, {"layer": "x" * 100_000},
]  # fmt: skip
# Values the controls may send (a stale page, a hand-made request).
MALFORMED_CONTROLS = [None, "", "Head 0", "Head 99999999999999999999", "Head -1", "\ud800", {"a": 1}, [1, 2],
                      float("nan"), 10**400, "x" * 100_000]  # fmt: skip
ANALYSIS_CASES = "analysis_"  # cases whose analysis/ folder is read (and, in the viewer, written)
INTERVENTION_CASES = "interventions_"  # cases holding a results.csv, opened in the Analysis tab
FUZZED_CASE = "surrogates_and_markup_in_names"  # the case also drawn as a figure and sent malformed input
_WRAPPER = re.compile(r'<div class="viewer-[a-z -]+"( role="status")?>|</div>')


def _html_text(value: object, where: str) -> str:
    """The text of an HTML output of the viewer's own (escaped lines in ``<div>``s); anything else in it
    is markup that came from somewhere else, a failure."""
    if not isinstance(value, str):
        return ""
    inner = _WRAPPER.sub("", value)
    if "<" in inner or ">" in inner:
        raise AssertionError(f"markup in {where}: {value[:300]!r}")
    return html.unescape(inner)


def _strings(value: object, found: list[str], depth: int = 0) -> None:
    """Every string in an output (payload dicts, choices of a dropdown, table cells), for checking."""
    if depth > 20:
        return
    if isinstance(value, str):
        found.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _strings(key, found, depth + 1)
            _strings(item, found, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _strings(item, found, depth + 1)
    elif hasattr(value, "to_dict") and callable(value.to_dict):  # a DataFrame
        _strings(value.to_dict("split"), found, depth + 1)
    elif hasattr(value, "constructor_args"):  # a gr.Dropdown / gr.Button update
        _strings(getattr(value, "constructor_args", {}), found, depth + 1)


class HandlerCheck:
    """Calls the viewer's handlers and checks each answer: a one-line escaped message or outputs whose
    strings are valid Unicode, whose HTML holds no markup but the viewer's own, and whose payloads are
    valid JSON."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, handler, *args):
        result = handler(*args)
        where = getattr(handler, "__name__", "handler")
        message = _html_text(result.message, f"{where} message")
        if message:
            if "\n" in message or len(message) > 600:
                raise AssertionError(f"{where}: message not one line: {message!r}")
            if "the viewer failed on this request" in message:
                raise AssertionError(f"{where}: a bug, not a message: {message}")
            self.messages.append(message)
        for name, value in result._asdict().items():
            if name.endswith("note"):
                _html_text(value, f"{where} {name}")
            if isinstance(value, dict):
                json.dumps(value, allow_nan=False)  # what the page's JSON.parse accepts
            found: list[str] = []
            _strings(value, found)
            for text in found:
                text.encode("utf-8")
        return result


def view_with_handlers(case: Case, temporary: Path, result: dict) -> list[str]:
    """Open the case in the viewer's handlers, as a browser session would, and use every view it offers;
    then send malformed clicks and control values. Returns the messages shown."""
    from vggt.viewer import handlers, views
    from vggt.viewer.state import CACHE, Session

    check = HandlerCheck()
    try:
        main = check(handlers.on_load, Session(), case.path)
        if main.message:
            raise ViewerRefused(check.messages[-1])
        session = main.session
        export = CACHE.get(session.export_key).export
        width, height = export.image_size[::-1]
        for x, y in ((0, 0), (width - 1, height - 1), (width / 2, height / 3)):
            session = check(handlers.on_query_select, session, 0.6, _Event({"x": x, "y": y})).session
        for name in export.layer_names:
            session = check(handlers.on_layer_change, session, name, 0.6).session
            for head in ("Head 1", "Head 2", "Average"):
                changed = check(handlers.on_head_change, session, head, 0.6)
                session = changed.session if not changed.message else session
        for mode in views.MODES:
            moved = check(handlers.on_mode(mode), session, 0.6)
            session = moved.session if not moved.message else session
        check(handlers.on_grid_frame, session, 1, 0.6)
        for panel in ("tokens", "camera", "3d", "reverse"):
            check(handlers.on_panels, session, 0.6, None, 0, panel)
        check(handlers.on_token_view, session, 0.6, None)
        check(handlers.on_reverse_frame, session, 0, 0.6)
        check(handlers.on_reverse_select, session, 0, 0.6, _Event({"x": 1, "y": 1}))
        if case.name.startswith(ANALYSIS_CASES):  # read back, else computed and saved beside the export
            check(handlers.on_analysis, session, 0.6, "cross_view_mass")
        if case.name.startswith(INTERVENTION_CASES):  # the sweep's results.csv sent with the export
            check(handlers.on_interventions, session, str(Path(case.bound) / "results.csv"), None)
        if case.name != FUZZED_CASE:
            return check.messages
        check(handlers.on_save_figure, session, 0.6)
        for data in MALFORMED_CLICKS:
            check(handlers.on_query_select, session, 0.6, _Event(data))
            check(handlers.on_open_cell, session, 0.6, _Event(data))
            check(handlers.on_reverse_select, session, 0, 0.6, _Event(data))
        for value in MALFORMED_CONTROLS:
            check(handlers.on_layer_change, session, value, 0.6)
            check(handlers.on_head_change, session, value, 0.6)
            check(handlers.on_head_change, session, "Average", value)
            check(handlers.on_grid_frame, session, value, 0.6)
            check(handlers.on_reverse_frame, session, value, 0.6)
            check(handlers.on_token_view, session, 0.6, value)
            check(handlers.on_panels, session, 0.6, value, value, value)
        return check.messages
    finally:
        result["temporary_bytes"] = folder_usage(temporary)[0]
        CACHE.clear()
        gc.collect()


class ViewerRefused(Exception):
    """The viewer's Load answered with a message (the case's error outcome)."""


def run_case(case: Case, corpus: Path, opened: OpenedFiles, temporary: Path, viewer: bool) -> dict:
    from vggt.attn_format import FormatError

    result: dict = {"name": case.name}
    started = time.perf_counter()
    opened.paths.clear()
    opened.active = True
    try:
        if viewer:
            view_with_handlers(case, temporary, result)
        else:
            for text in view_with_reader(case, temporary, result):
                text.encode("utf-8")  # every string shown can be sent to a browser
        result["outcome"] = VIEW
    except (FormatError, ViewerRefused) as exc:
        result["outcome"], result["message"] = "error", str(exc)
    except BaseException as exc:  # noqa: BLE001 - what escapes is the finding
        result["outcome"] = "escaped"
        result["message"] = f"{type(exc).__name__}: {exc}"[:500]
        result["traceback"] = traceback.format_exc()[-3000:]
    finally:
        opened.active = False
    gc.collect()
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["opened_outside"] = outside_opens(case, corpus, opened.paths, temporary)
    result["temporary_left"] = folder_usage(temporary)[1]
    return result


def main(argv: list[str]) -> int:
    cases_file, results_file, target = Path(argv[0]), Path(argv[1]), argv[2]
    cases = read_cases(cases_file)
    corpus = cases_file.parent.resolve()
    temporary = Path(tempfile.gettempdir()).resolve()
    viewer = target == "viewer"
    import vggt.analysis  # noqa: F401 - numba reads /proc/cpuinfo once, as it starts (on import)
    import vggt.attn_format  # noqa: F401 - imported before the limit, as the viewer has it loaded

    if viewer:
        import matplotlib.figure  # noqa: F401

        import vggt.viewer.figures  # noqa: F401
        import vggt.viewer.handlers  # noqa: F401

    if any(case.path.startswith("hf://") for case in cases):  # huggingface_hub's own start-up reads
        from vggt.attn_format import FormatError, open_export

        try:
            open_export("hf://datasets/hostile/not-a-case")
        except FormatError:
            pass
    limit = limit_address_space()
    opened = OpenedFiles()
    results = [run_case(case, corpus, opened, temporary, viewer) for case in cases]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {"results": results, "address_limit": limit, "max_rss_kib": usage.ru_maxrss}
    results_file.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
