"""The results of an intervention sweep on disk: ``results.csv``, one row per intervention.

Written by ``intervene_attention.py``, read by its figures and by the viewer (no torch needed). The
first row is the unmodified run (kind ``none``): its errors against itself are 0 and its ``truth_*``
errors are the model's own. A file that comes from someone else is checked as it is read: known
columns, a bounded size, numbers where numbers belong.
"""

from __future__ import annotations

import csv
import io
import math
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vggt.intervention_metrics import ERROR_COLUMNS, TRUTH_PREFIX

RESULTS_NAME = "results.csv"
KINDS = ("none", "ablate_heads", "mask_keys", "global_to_frame", "block_sparse")
# Column -> meaning, in file order.
ID_COLUMNS: Mapping[str, str] = {
    "intervention": "what was changed, in words",
    "kind": f"one of {', '.join(KINDS)}",
    "layers": "the layers changed, as kind:numbers (1-based), e.g. global:13-24",
    "head": "the ablated head (1-based); empty for other kinds",
    "value": "the kept mass of a key mask or the threshold of block sparsity; empty otherwise",
    "kept_pairs": "share of the changed layers' (head, query, key) attention entries kept",
}
COLUMNS: Mapping[str, str] = {
    **ID_COLUMNS,
    **ERROR_COLUMNS,
    **{
        TRUTH_PREFIX + name: f"the same against the true geometry, {meaning}"
        for name, meaning in ERROR_COLUMNS.items()
    },
}
NUMBER_COLUMNS = ("value", "kept_pairs", *ERROR_COLUMNS, *(TRUTH_PREFIX + name for name in ERROR_COLUMNS))
MAX_RESULTS_BYTES = 64 << 20
MAX_ROWS = 100_000
MAX_HEAD = 4096


class ResultsError(ValueError):
    """A results file that cannot be read (one-line message)."""


@dataclass(frozen=True)
class ResultRow:
    """One row of ``results.csv``: identifying fields, then numbers (NaN where not measured)."""

    intervention: str
    kind: str
    layers: str
    head: int | None
    numbers: Mapping[str, float]

    def __getitem__(self, column: str) -> float:
        return self.numbers[column]


def format_number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}"


def write_results(path: str | os.PathLike[str], rows: Iterable[ResultRow]) -> None:
    """Write ``rows`` as ``results.csv`` at ``path``."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow(
                [row.intervention, row.kind, row.layers, "" if row.head is None else row.head]
                + [format_number(row.numbers.get(column)) for column in NUMBER_COLUMNS]
            )


def read_results(path: str | os.PathLike[str]) -> list[ResultRow]:
    """Read a ``results.csv`` (or the folder holding one); raises :class:`ResultsError` for anything that
    is not one: not a regular file, over :data:`MAX_RESULTS_BYTES` or :data:`MAX_ROWS`, other columns,
    an unknown kind, a head that is not a positive number, a number column holding text or infinity."""
    path = Path(path)
    try:
        if path.is_dir():
            path = path / RESULTS_NAME
        if not stat.S_ISREG(path.stat().st_mode):  # a device or a pipe would be read without end
            raise ResultsError(f"{path} is not a results file (not a regular file)")
        with open(path, "rb") as handle:
            data = handle.read(MAX_RESULTS_BYTES + 1)
        if len(data) > MAX_RESULTS_BYTES:
            raise ResultsError(f"{path} is larger than {MAX_RESULTS_BYTES >> 20} MB: not a results file")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header is None or list(header) != list(COLUMNS):
            raise ResultsError(f"{path} is not an intervention results file (its columns differ)")
        return [_parse_row(path, line, fields) for line, fields in enumerate(reader, start=2)]
    except csv.Error as err:
        raise ResultsError(f"{path}, line {reader.line_num}: not CSV ({err})") from None


def _parse_row(path: Path, line: int, fields: list[str]) -> ResultRow:
    if line > MAX_ROWS + 1:
        raise ResultsError(f"{path} holds more than {MAX_ROWS} rows")
    if len(fields) != len(COLUMNS):
        raise ResultsError(f"{path}, line {line}: {len(fields)} fields, expected {len(COLUMNS)}")
    intervention, kind, layers, head = fields[:4]
    if kind not in KINDS:
        raise ResultsError(f"{path}, line {line}: unknown kind {kind[:40]!r}")
    if head and not (head.isascii() and head.isdigit() and 1 <= int(head) <= MAX_HEAD):
        raise ResultsError(f"{path}, line {line}: head {head[:40]!r} is not a number from 1 to {MAX_HEAD}")
    try:
        numbers = {
            column: float(text) if text else math.nan
            for column, text in zip(NUMBER_COLUMNS, fields[4:], strict=True)
        }
    except ValueError:
        raise ResultsError(f"{path}, line {line}: a number column holds something else") from None
    if any(math.isinf(value) for value in numbers.values()):
        raise ResultsError(f"{path}, line {line}: a number column holds an infinity")
    return ResultRow(intervention, kind, layers, int(head) if head else None, numbers)


def ablated_layer(row: ResultRow) -> tuple[str, int] | None:
    """The layer kind and 1-based number of a single-head ablation row (``global:12``), else None."""
    if row.kind != "ablate_heads" or row.head is None:
        return None
    kind, _, number = row.layers.partition(":")
    if not (number.isascii() and number.isdigit()) or len(number) > 6:
        return None
    return kind, int(number)


def ablation_grid(
    rows: Sequence[ResultRow], column: str, layer_kind: str = "global"
) -> tuple[list[int], int, np.ndarray]:
    """Head-ablation results of one layer kind as a layers x heads matrix.

    Returns the layer numbers (1-based, ascending), the number of heads (the largest head seen) and
    ``[layers, heads]`` float64 values of ``column`` (NaN where a head was not ablated).
    """
    cells: dict[tuple[int, int], float] = {}
    for row in rows:
        layer = ablated_layer(row)
        if layer is not None and layer[0] == layer_kind:
            cells[layer[1], row.head] = row[column]
    layers = sorted({layer for layer, _ in cells})
    heads = max((head for _, head in cells), default=0)
    grid = np.full((len(layers), heads), np.nan)
    for (layer, head), value in cells.items():
        grid[layers.index(layer), head - 1] = value
    return layers, heads, grid
