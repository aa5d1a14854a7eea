"""File helpers shared by the public-file readers (`public`) and the user-file adapter (`sources`).

Each names the file and the line (or record) of what it cannot read, as a `DataError`.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import tempfile
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


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No progress bars or log lines from `datasets` while it reads: a bad file gives one error line."""
    bars_off, level = datasets.utils.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if not bars_off:
            datasets.utils.enable_progress_bars()


def local_dataset(path: Path, fmt: str, split: str | None, label: str) -> tuple[Any, str]:
    """A Parquet, JSON or Arrow file, or an Arrow `save_to_disk` folder, read by `datasets`' local builders.

    Nothing is downloaded (`local_files_only`); the builders' cache lives in a temporary folder, removed
    once the rows are in memory, so reading leaves nothing behind.

    Args:
        path: the file or folder. fmt: `parquet`, `json` or `arrow`. label: how errors name it.
        split: the split to read from a folder holding a DatasetDict (None: its only split).

    Returns:
        The `datasets.Dataset` and its label (`<label>[<split>]` for a split of a DatasetDict).

    Raises:
        DataError: the file cannot be read as `fmt`, or the split is missing, unknown or ambiguous.
    """
    import datasets  # ~1.5 s: only when a source needs it
    import pyarrow

    try:
        with _quiet(datasets), tempfile.TemporaryDirectory(prefix="secvec-datasets-") as cache:
            if fmt == "arrow" and path.is_dir():
                loaded = datasets.load_from_disk(str(path))
            else:
                options = {"parse_agent_traces": False} if fmt == "json" else {}  # records stay as written
                loaded = datasets.load_dataset(
                    fmt, data_files=glob.escape(str(path)), split="train", cache_dir=cache, keep_in_memory=True,
                    download_config=datasets.DownloadConfig(local_files_only=True), **options)
    except (datasets.exceptions.DatasetsError, pyarrow.ArrowException, OSError, ValueError, TypeError,
            KeyError, IndexError) as err:  # IndexError: datasets 5.2 loading a folder of 0 rows
        if "corresponds to no data" in str(err):  # datasets refuses an empty file's split (5.2's wording)
            raise DataError.at(label, None, None, "no records (an empty file)") from None
        raise DataError.at(label, None, None, f"cannot read it as {fmt}: {err.__cause__ or err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None and len(loaded) != 1:
            raise DataError.at(label, None, "split", f"a DatasetDict of the splits {', '.join(loaded)}: name one")
        split = split if split is not None else next(iter(loaded))
        if split not in loaded:
            raise DataError.at(label, None, "split", f"no split {split!r} (splits: {', '.join(loaded)})")
        return loaded[split], f"{label}[{split}]"
    if split is not None:
        raise DataError.at(label, None, "split", "the folder holds one Dataset, not a DatasetDict: leave it out")
    return loaded, label
