"""Runs the hostile corpus in a child process: ``python -m tests.hostile_child CASES.json RESULTS.json``.

The child limits its own address space to what it had after start-up plus :data:`EXTRA_ADDRESS_SPACE`,
records every file it opens (Python's audit hook), and after each case records the bytes under its
temporary folder (``TMPDIR``, private to it: the parent checks it is empty once the child has exited)
before and after the case's export is closed. Each case is opened as the viewer opens an export,
then every layer, head, query row, reverse view and frame it offers is read.
"""

from __future__ import annotations

import gc
import json
import os
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


def run_case(case: Case, corpus: Path, opened: OpenedFiles, temporary: Path) -> dict:
    from vggt.attn_format import FormatError

    result: dict = {"name": case.name}
    started = time.perf_counter()
    opened.paths.clear()
    opened.active = True
    try:
        shown = view_with_reader(case, temporary, result)
        result["outcome"] = VIEW
        for text in shown:
            text.encode("utf-8")  # every string shown can be sent to a browser
    except FormatError as exc:
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
    cases_file, results_file = Path(argv[0]), Path(argv[1])
    cases = read_cases(cases_file)
    corpus = cases_file.parent.resolve()
    temporary = Path(tempfile.gettempdir()).resolve()
    import vggt.attn_format  # noqa: F401 - imported before the limit, as the viewer has it loaded

    limit = limit_address_space()
    opened = OpenedFiles()
    results = [run_case(case, corpus, opened, temporary) for case in cases]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {"results": results, "address_limit": limit, "max_rss_kib": usage.ru_maxrss}
    results_file.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
