"""The generic file adapter: the user's CSV (header row), JSONL or TXT files, each feeding one role.

A config's `sources` replace (or, with `replace: false`, extend) the preset's examples of their role; every
record's `source` is `<file>:<line>`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from secvec.config import DataConfig, SourceConfig
from secvec.data.files import csv_rows
from secvec.data.schema import DataError, chat, read_jsonl, read_text
from secvec.paths import resolve_path


def _source_rows(path: Path, source: SourceConfig) -> Iterator[tuple[int, dict]]:
    """(line, row) of a CSV (header required), JSONL or TXT (one prompt per line) file."""
    if source.format == "jsonl":
        yield from read_jsonl(path, source.path)
    elif source.format == "txt":
        for line, text in enumerate(read_text(path, source.path).split("\n"), 1):
            if text.strip():
                yield line, {source.prompt_field: text.strip()}
    else:
        rows = csv_rows(path, source.path)
        line, header = next(rows, (1, []))
        if not header:
            raise DataError.at(source.path, 1, source.prompt_field, "no records (an empty CSV file)")
        if any("\udc80" <= c <= "\udcff" for c in "".join(header)):  # before column names are echoed
            raise DataError.at(source.path, line, None, "invalid UTF-8 in the header row")
        named = (source.prompt_field, source.response_field, source.answer_field, source.category_field,
                 source.id_field)
        for field in filter(None, named):
            if field not in header:
                raise DataError.at(source.path, line, field, f"no such column (columns: {', '.join(header)})")
        for line, cells in rows:
            yield line, dict(zip(header, cells, strict=False))


def _text(row: Mapping, field: str, label: str, line: int) -> str:
    value = row.get(field)
    if isinstance(value, bool) or not isinstance(value, str | int | float) or not str(value).strip():
        problem = "missing" if value in (None, "") else f"expected text, got {value!r}"
        raise DataError.at(label, line, field, problem)
    if any("\udc80" <= c <= "\udcff" for c in str(value)):  # undecodable bytes, kept by read_text
        raise DataError.at(label, line, field, "invalid UTF-8")
    return str(value)


def read_source(source: SourceConfig, root: Path | None = None, max_chars: int | None = None) -> list[dict]:
    """The records of one generic source file, in file order.

    Args:
        source: the file, its format, column names, role and whether its prompts are harmful.
        root: the folder a relative `source.path` is resolved against (default: the project root).
        max_chars: the limit on the characters of one record (prompt, response and answer).

    Raises:
        DataError: `file:line: field 'column': ...` for a missing column or value, invalid UTF-8, an
            over-long record, a duplicate id, or a file without records.
    """
    label, records, ids = source.path, [], {}
    fields = {"prompt": source.prompt_field, "response": source.response_field, "answer": source.answer_field,
              "category": source.category_field, "id": source.id_field}
    for line, row in _source_rows(resolve_path(source.path, root), source):
        if source.limit is not None and len(records) == source.limit:
            break
        get = {key: _text(row, field, label, line) if field else None for key, field in fields.items()}
        size = sum(len(get[k] or "") for k in ("prompt", "response", "answer"))
        if max_chars is not None and size > max_chars:
            longest = "response" if len(get["response"] or "") > len(get["prompt"]) else "prompt"
            raise DataError.at(label, line, fields[longest],
                               f"record has {size} characters, more than max_chars={max_chars}")
        if get["id"] is not None:
            if get["id"] in ids:
                raise DataError.at(label, line, source.id_field,
                                   f"duplicate id {get['id']!r} (first on line {ids[get['id']]})")
            ids[get["id"]] = line
        record = chat(get["prompt"], get["response"], source=f"{label}:{line}", is_harmful=source.is_harmful,
                      category=get["category"] or source.category or Path(label).stem, answer=get["answer"])
        records.append({**record, "id": get["id"]} if get["id"] else record)
    if not records:
        raise DataError.at(label, 1, source.prompt_field, "no records")
    return records


def apply_sources(records: Mapping[str, list[dict]], config: DataConfig,
                  root: Path | None = None) -> dict[str, list[dict]]:
    """The preset's records per role with the config's generic sources replacing or extending roles."""
    cleared = {source.role for source in config.sources if source.replace}
    out = {role: [] if role in cleared else list(recs) for role, recs in records.items()}
    for source in config.sources:
        out.setdefault(source.role, []).extend(read_source(source, root, config.max_chars))
    return out
