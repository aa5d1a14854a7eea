"""The generic file adapter: the user's files, each feeding one role, as the schema's records.

Parquet, JSON and Arrow (an `.arrow` file or a `save_to_disk` folder) are read by `datasets`' local builders
(`files.local_dataset`). CSV, JSONL and TXT keep readers of our own because they check what `datasets`
does not: they name the line of a bad record (datasets knows row indices only), they name the field holding
invalid UTF-8 (datasets fails the whole file), and CSV cells stay the exact text (pandas, behind datasets'
CSV builder, reads "NA" as missing and "007" as 7).

A record is prompt/response text (`prompt_field`, `response_field`), TRL's conversational format (a list of
{role, content} under `messages_field`) or TRL's conversational prompt/completion (both fields hold message
lists). A CSV cell is text, so CSV chats go in a messages column as JSON. Records of datasets-read files
are named `record <index>` (from 0, as `dataset[index]`), others by line; a record's `source` is
`<file>:<line>` or `<file>:record <index>`. A config's `sources` replace (or, with `replace: false`,
extend) the preset's examples of their role.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from secvec.config import DataConfig, SourceConfig
from secvec.data.files import csv_rows, local_dataset
from secvec.data.schema import CHAT_ROLES, EVAL_ROLES, DataError, read_jsonl, read_text
from secvec.paths import resolve_path

DATASETS_FORMATS = ("parquet", "json", "arrow")  # read by `datasets`; the others by the readers here
Where = int | str  # a line, or `record <index>` of a datasets-read file
Turn = tuple[str, str, dict]  # the user's fields holding a message's content and role, and the message


def _columns(source: SourceConfig) -> tuple[str, ...]:
    chat = source.messages_field or source.prompt_field
    return tuple(filter(None, (chat, source.response_field, source.answer_field, source.category_field,
                               source.id_field)))


def _check_columns(label: str, line: int | None, columns: list[str], source: SourceConfig) -> None:
    for field in _columns(source):
        if field not in columns:
            raise DataError.at(label, line, field, f"no such column (columns: {', '.join(columns)})")


def _csv_records(path: Path, source: SourceConfig) -> Iterator[tuple[int, dict]]:
    rows = csv_rows(path, source.path)
    line, header = next(rows, (1, []))
    if not header:
        raise DataError.at(source.path, 1, _columns(source)[0], "no records (an empty CSV file)")
    if any("\udc80" <= c <= "\udcff" for c in "".join(header)):  # before column names are echoed
        raise DataError.at(source.path, line, None, "invalid UTF-8 in the header row")
    _check_columns(source.path, line, header, source)
    for line, cells in rows:
        yield line, dict(zip(header, cells, strict=False))


def _source_rows(path: Path, source: SourceConfig) -> tuple[str, Iterator[tuple[Where, Mapping]]]:
    """The label naming the file (and split) in errors, and (line or record, row) in file order."""
    if source.format in DATASETS_FORMATS:
        dataset, label = local_dataset(path, source.format, source.split, source.path)
        _check_columns(label, None, dataset.column_names, source)
        return label, ((f"record {i}", row) for i, row in enumerate(dataset))
    if source.format == "jsonl":
        return source.path, read_jsonl(path, source.path)
    if source.format == "txt":
        lines = enumerate(read_text(path, source.path).split("\n"), 1)
        return source.path, ((n, {source.prompt_field: text.strip()}) for n, text in lines if text.strip())
    return source.path, _csv_records(path, source)


def _invalid_utf8(text: str) -> bool:
    """A surrogate: an undecodable byte kept by `read_text`, or a `\\ud800`-style JSON escape."""
    return any("\ud800" <= c <= "\udfff" for c in text)


def _text(row: Mapping, field: str, label: str, line: Where) -> str:
    value = row.get(field)
    if isinstance(value, bool) or not isinstance(value, str | int | float) or not str(value).strip():
        problem = "missing" if value in (None, "") else f"expected text, got {value!r}"
        raise DataError.at(label, line, field, problem)
    if _invalid_utf8(str(value)):
        raise DataError.at(label, line, field, "invalid UTF-8")
    return str(value)


def _decoded(value: str) -> Any:
    """A message list stored as JSON text (a CSV cell). Not the repr `Dataset.to_csv` writes: pandas prints
    a list as a numpy array, without commas, which nothing parses back."""
    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # also an integer beyond Python's 4300 digits
        return value


def _messages(value: Any, field: str, label: str, line: Where) -> list[Turn]:
    """TRL's `[{role, content}, ...]` as the schema's messages, each with the user's field path."""
    value = _decoded(value) if isinstance(value, str) else value
    columns = isinstance(value, Mapping) and {"role", "content"} <= set(value)  # datasets' Sequence(dict)
    if columns and all(isinstance(v, list) for v in value.values()):
        try:
            value = [dict(zip(value, turn, strict=True)) for turn in zip(*value.values(), strict=True)]
        except ValueError:
            pass  # lists of different lengths: refused below
    if not isinstance(value, list) or not value or not all(isinstance(m, Mapping) for m in value):
        shown = "nothing" if value in (None, "", []) else repr(value)[:80]
        raise DataError.at(label, line, field, f"expected a list of {{role, content}} messages, got {shown}")
    turns = []
    for i, message in enumerate(value):
        at = f"{field}[{i}]"
        if extra := sorted(str(k) for k, v in message.items() if k not in ("role", "content") and v is not None):
            raise DataError.at(label, line, f"{at}.{extra[0]}", "not supported: a message holds role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant", "system"):
            raise DataError.at(label, line, f"{at}.role", f"expected user, assistant or system, got {repr(role)[:80]}")
        if not isinstance(content, str) or not content.strip():
            problem = ("missing" if content in (None, "") else "blank" if isinstance(content, str)
                       else f"expected text, got {repr(content)[:80]}")
            raise DataError.at(label, line, f"{at}.content", problem)
        if _invalid_utf8(content):
            raise DataError.at(label, line, f"{at}.content", "invalid UTF-8")
        turns.append((f"{at}.content", f"{at}.role", {"role": role, "content": content}))
    return turns


def _part(row: Mapping, field: str, role: str, label: str, line: Where) -> list[Turn]:
    """A prompt or reply: text is one turn of `role`; a list is TRL's conversational prompt/completion."""
    if isinstance(row.get(field), list | Mapping):
        return _messages(row[field], field, label, line)
    return [(field, field, {"role": role, "content": _text(row, field, label, line)})]


def _turns(row: Mapping, source: SourceConfig, label: str, line: Where) -> list[Turn]:
    """The record's chat, checked against its role as the schema would, but naming the user's fields."""
    if source.messages_field:
        turns = _messages(row.get(source.messages_field), source.messages_field, label, line)
    else:
        turns = _part(row, source.prompt_field, "user", label, line)
        if source.response_field:
            reply = _part(row, source.response_field, "assistant", label, line)
            if [message["role"] for *_, message in reply] != ["assistant"]:  # the one turn that is trained
                raise DataError.at(label, line, source.response_field, "expected the reply, one assistant "
                                   f"message; got the roles {[message['role'] for *_, message in reply]}")
            turns += reply
    roles = [message["role"] for *_, message in turns]
    if "user" not in roles:
        raise DataError.at(label, line, source.messages_field or source.prompt_field, "needs a user turn")
    if source.role in CHAT_ROLES and roles[-1] != "assistant":
        raise DataError.at(label, line, turns[-1][1], f"{source.role} examples end with the assistant's reply")
    if source.role in EVAL_ROLES and "assistant" in roles:
        raise DataError.at(label, line, turns[roles.index("assistant")][1],
                           f"{source.role} examples hold only the prompt")
    return turns


def read_source(source: SourceConfig, root: Path | None = None, max_chars: int | None = None) -> list[dict]:
    """The records of one generic source file, in file order.

    Args:
        source: the file, its format, column names, role and whether its prompts are harmful.
        root: the folder a relative `source.path` is resolved against (default: the project root).
        max_chars: the limit on the characters of one record (all messages and the answer).

    Raises:
        DataError: `file:line: field 'column': ...` (`file:record <index>: ...` for Parquet, JSON and Arrow)
            for a missing column or value, a malformed message, invalid UTF-8, an over-long record, a
            duplicate id, an unreadable file or split, or a file without records.
    """
    label, rows = _source_rows(resolve_path(source.path, root), source)
    records, ids = [], {}
    for line, row in rows:
        if source.limit is not None and len(records) == source.limit:
            break
        turns = _turns(row, source, label, line)
        get = {key: _text(row, field, label, line) if field else None for key, field in
               (("answer", source.answer_field), ("category", source.category_field), ("id", source.id_field))}
        sizes = [(content_field, len(message["content"])) for content_field, _, message in turns]
        size = sum(n for _, n in sizes) + len(get["answer"] or "")
        if max_chars is not None and size > max_chars:
            longest = max(sizes, key=lambda s: s[1])[0]
            raise DataError.at(label, line, longest, f"record has {size} characters, more than max_chars={max_chars}")
        if get["id"] is not None:
            if get["id"] in ids:
                first = f"on line {ids[get['id']]}" if isinstance(line, int) else f"at {ids[get['id']]}"
                raise DataError.at(label, line, source.id_field, f"duplicate id {get['id']!r} (first {first})")
            ids[get["id"]] = line
        record = {"source": f"{label}:{line}", "is_harmful": source.is_harmful, "answer": get["answer"],
                  "category": get["category"] or source.category or Path(source.path).stem,
                  "messages": [message for *_, message in turns]}
        records.append({**record, "id": get["id"]} if get["id"] else record)
    if not records:
        raise DataError.at(label, 1 if source.format not in DATASETS_FORMATS else None, _columns(source)[0],
                           "no records")
    return records


def apply_sources(records: Mapping[str, list[dict]], config: DataConfig,
                  root: Path | None = None) -> dict[str, list[dict]]:
    """The preset's records per role with the config's generic sources replacing or extending roles."""
    cleared = {source.role for source in config.sources if source.replace}
    out = {role: [] if role in cleared else list(recs) for role, recs in records.items()}
    for source in config.sources:
        out.setdefault(source.role, []).extend(read_source(source, root, config.max_chars))
    return out
