"""File helpers shared by the public-file readers (`public`) and the user-file adapter (`sources`).

Each names the file and the line (or record) of what it cannot read, as a `DataError`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from secvec.data.schema import DataError, read_text


def text_field(obj: Mapping, key: str, label: str, line: int) -> str:
    """The string under `key`; a missing or non-text value names the file, line and field."""
    value = obj.get(key)
    if not isinstance(value, str):
        raise DataError.at(label, line, key, "missing" if value is None else f"expected text, got {value!r}")
    return value


def join_parts(*parts: str | None) -> str:
    """The non-blank parts, separated by a blank line (e.g. an instruction and its input)."""
    return "\n\n".join(p for p in parts if p and p.strip())


def csv_rows(path: Path, label: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(first line of the row, cells) of every non-empty CSV row."""
    reader = csv.reader(io.StringIO(read_text(path, label), newline=""))
    start = 1
    try:
        for row in reader:
            if row:
                yield start, row
            start = reader.line_num + 1
    except csv.Error as err:  # e.g. a field over csv's limit of 131,072 characters
        raise DataError.at(label, reader.line_num, None, f"invalid CSV: {err}") from None


def csv_dicts(shared: Path, name: str) -> list[tuple[int, dict[str, str]]]:
    """(line, row by column name) of a CSV file with a header row."""
    rows = csv_rows(shared / name, name)
    header = next(rows, (1, []))[1]
    return [(line, dict(zip(header, cells, strict=False))) for line, cells in rows]


def json_records(shared: Path, name: str) -> Iterator[tuple[int, Any]]:
    """(record number, item) of a JSON list."""
    try:
        items = json.loads(read_text(shared / name, name))
    except json.JSONDecodeError as err:
        raise DataError.at(name, err.lineno, None, f"invalid JSON: {err.msg}") from None
    yield from enumerate(items if isinstance(items, list) else [items], 1)
