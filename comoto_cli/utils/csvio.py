"""CSV tables as plain column dictionaries (no pandas), with row-precise error messages.

Row numbers in errors are file line numbers as a spreadsheet shows them: the header is row 1. Which columns each
table the CLI reads or writes has, and what they mean, is defined in :mod:`comoto_cli.data.tables`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from comoto_cli.errors import InputDataError
from comoto_cli.utils.atomic import atomic_path

MAX_EXACT_INT = 2**53  # the largest integer range a float64 (how cells are parsed) holds exactly


@dataclass
class CsvTable:
    """A CSV file read as text columns. ``rows[i]`` is the file row number of record ``i``."""

    path: Path
    columns: dict[str, list[str]]
    rows: list[int]

    def __len__(self) -> int:
        return len(self.rows)

    def text(self, name: str) -> list[str]:
        return self.columns[name]

    def floats(self, name: str, *, allow_empty: bool = False) -> np.ndarray:
        """Column as float64; empty cells become NaN only when ``allow_empty``; errors name the row."""
        values = np.empty(len(self), dtype=np.float64)
        for index, cell in enumerate(self.columns[name]):
            cell = cell.strip()
            if cell == "":
                if allow_empty:
                    values[index] = math.nan
                    continue
                raise InputDataError(f"column {name!r} is empty", path=self.path, row=self.rows[index])
            try:
                values[index] = float(cell)
            except ValueError:
                raise InputDataError(
                    f"column {name!r} is not a number: {cell!r}", path=self.path, row=self.rows[index]
                ) from None
            if not math.isfinite(values[index]):
                raise InputDataError(f"column {name!r} is not finite: {cell!r}", path=self.path, row=self.rows[index])
        return values

    def ints(self, name: str) -> np.ndarray:
        values = self.floats(name)
        bad = np.flatnonzero(values != np.round(values))
        if bad.size:
            raise InputDataError(
                f"column {name!r} is not an integer: {self.columns[name][bad[0]]!r}", path=self.path, row=self.rows[bad[0]]
            )
        huge = np.flatnonzero(np.abs(values) > MAX_EXACT_INT)  # beyond this, floats skip integers (and int64 ends)
        if huge.size:
            cell = self.columns[name][huge[0]]
            raise InputDataError(f"column {name!r} is out of range: {cell[:40]!r}", path=self.path,
                                 row=self.rows[huge[0]])
        return values.astype(np.int64)


def read_header(path: str | Path) -> list[str]:
    """The header of a CSV file (for finding files by their columns); [] when unreadable."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return [name.strip() for name in next(csv.reader(handle), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def read_csv(path: str | Path, required: Sequence[str], optional: Iterable[str] = ()) -> CsvTable:
    """Read ``path`` keeping ``required`` (must exist) and ``optional`` columns.

    Raises InputDataError for a missing file, non-UTF-8 bytes, a missing or duplicated column, or a row
    with the wrong number of cells, naming the file and row.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputDataError("CSV file not found", path=path) from None
    except OSError as exc:
        raise InputDataError(f"cannot read CSV: {exc.strerror or exc}", path=path) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        row = raw[: exc.start].count(b"\n") + 1
        raise InputDataError(f"not UTF-8 text (byte {exc.start})", path=path, row=row) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise InputDataError("CSV file is empty (no header)", path=path) from None
    except csv.Error as exc:
        raise InputDataError(f"malformed CSV: {exc}", path=path, row=1) from None
    seen: set[str] = set()
    for name in header:
        if name in seen and name in set(required) | set(optional):
            raise InputDataError(f"column {name!r} appears more than once", path=path, row=1)
        seen.add(name)
    missing = [name for name in required if name not in header]
    if missing:
        raise InputDataError(
            f"missing column(s) {', '.join(repr(m) for m in missing)}; found {', '.join(header)}", path=path, row=1
        )
    wanted = [name for name in list(required) + [o for o in optional if o not in required] if name in header]
    positions = {name: header.index(name) for name in wanted}
    columns: dict[str, list[str]] = {name: [] for name in wanted}
    rows: list[int] = []
    end = reader.line_num  # the header's last line
    try:
        for record in reader:
            # A record starts on the line after the previous one ends: a quoted cell may hold newlines, and a
            # spreadsheet numbers the record by its first line (csv's line_num is its last).
            line, end = end + 1, reader.line_num
            if not record or all(cell.strip() == "" for cell in record):
                continue
            if len(record) != len(header):
                raise InputDataError(
                    f"has {len(record)} cells, header has {len(header)}", path=path, row=line
                )
            for name, position in positions.items():
                columns[name].append(record[position].strip())
            rows.append(line)
    except csv.Error as exc:
        raise InputDataError(f"malformed CSV: {exc}", path=path, row=reader.line_num) from None
    return CsvTable(path=path, columns=columns, rows=rows)


def write_csv_atomic(path: str | Path, header: Sequence[str], records: Iterable[Sequence[object]]) -> None:
    """Write a CSV through a temporary file and rename (no half-written output)."""

    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(records)
