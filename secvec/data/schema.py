"""The dataset contract: example schema, roles, loading, validation and the leakage check.

Every role is one `data/<role>.jsonl` file (one example per line, keys sorted, UTF-8, `\\n` endings) beside
`data/manifest.json`. Bad input raises `DataError`, whose message starts with `file:line: field 'x':`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from secvec.text import normalize_prompt

Role = Literal["align", "sv_fit", "sv_val", "finetune", "eval_harmful", "eval_over_refusal", "eval_utility"]
ROLES: tuple[str, ...] = get_args(Role)
TRAIN_ROLES = ("align", "sv_fit", "finetune")
EVAL_ROLES = ("eval_harmful", "eval_over_refusal", "eval_utility")
# Held out from training like the evaluation roles, but shaped like training chats (prompt + reply).
CHAT_ROLES = (*TRAIN_ROLES, "sv_val")
HELD_OUT_ROLES = ("sv_val", *EVAL_ROLES)


class DataError(ValueError):
    """Bad input data: the message names the file, the line (or `record <index>`) and the field."""

    @classmethod
    def at(cls, file: str | Path, line: int | str | None, field: str | None, message: str) -> DataError:
        where = f"{file}:{line}" if line is not None else str(file)
        what = f": field '{field}'" if field else ""
        text = " ".join(f"{where}{what}: {message}".split())  # always one line
        return cls(text.encode("utf-8", "backslashreplace").decode())  # printable: undecodable bytes as \\udcff


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    return text


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    role: Literal["user", "assistant", "system"]
    content: Annotated[str, AfterValidator(_not_blank)]


class Example(BaseModel):
    """One chat example of a role (see docs/ARCHITECTURE.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: Annotated[str, AfterValidator(_not_blank)]
    source: str
    role: Role
    category: str
    is_harmful: bool
    messages: list[Message] = Field(min_length=1)
    answer: str | None = None


class Manifest(BaseModel):
    """What `data/manifest.json` records: examples (and harmful ones) per role and the full config."""

    model_config = ConfigDict(frozen=True)

    format: str = "secvec-data/1"
    preset: str
    seed: int
    counts: dict[str, int]
    harmful: dict[str, int]
    config: dict[str, Any]

    @classmethod
    def of(cls, roles: Mapping[str, Sequence[Mapping]], preset: str, seed: int, config: dict[str, Any]) -> Manifest:
        """The manifest of these roles: examples and harmful ones per role."""
        return cls(preset=preset, seed=seed, config=config, counts={r: len(v) for r, v in roles.items()},
                   harmful={r: sum(ex["is_harmful"] for ex in v) for r, v in roles.items()})


def format_loc(loc: Sequence[str | int]) -> str:
    """`('messages', 1, 'content')` -> `messages[1].content`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def chat(prompt: str, response: str | None = None, *, source: str, category: str, is_harmful: bool,
         answer: str | None = None) -> dict:
    """A record without id and role: a user prompt and, for training roles, the assistant's reply."""
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return {"source": source, "category": category, "is_harmful": is_harmful, "messages": messages,
            "answer": answer}


def prompt_text(example: Mapping) -> str:
    return "\n".join(m["content"] for m in example["messages"] if m["role"] != "assistant")


def _bad_utf8_field(obj: Any, loc: tuple = ()) -> str | None:
    """Path of the first string holding a surrogate: an undecodable byte (kept by surrogateescape) or a
    JSON `\\ud800`-style escape; neither can be written back as UTF-8."""
    if isinstance(obj, str):
        return (format_loc(loc) or "line") if any("\ud800" <= c <= "\udfff" for c in obj) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:  # keys too: a corrupt key is as invalid as a corrupt value
        if field := _bad_utf8_field(key, (*loc, key)) or _bad_utf8_field(value, (*loc, key)):
            return field
    return None


def read_text(path: Path, label: str | Path) -> str:
    """The file's text; undecodable bytes stay as surrogates so callers can name the field holding them."""
    if not path.is_file():
        raise DataError.at(label, None, None, "file not found")
    return path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def read_jsonl(path: Path, label: str | Path | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-empty line of a JSONL file."""
    label = label or path
    for number, line in enumerate(read_text(path, label).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            field = _bad_utf8_field(obj)
        except json.JSONDecodeError as err:
            problem = "invalid UTF-8" if _bad_utf8_field(line) else f"invalid JSON: {err.msg}"
            raise DataError.at(label, number, None, problem) from None
        except RecursionError:  # `[[[[...` deeper than Python's recursion limit
            raise DataError.at(label, number, None, "invalid JSON: nested too deeply") from None
        except ValueError as err:  # an integer of more than 4300 digits
            raise DataError.at(label, number, None, f"invalid JSON: {str(err).split(':')[0]}") from None
        if not isinstance(obj, dict):
            raise DataError.at(label, number, None, f"expected a JSON object, got {type(obj).__name__}")
        if field:
            raise DataError.at(label, number, field, "invalid UTF-8")
        yield number, obj


def _check_example(obj: Mapping, label: str, line: int, max_chars: int | None) -> dict:
    origin = f" (source {obj.get('source')})" if isinstance(obj, Mapping) and obj.get("source") else ""
    try:
        example = Example.model_validate(obj)
    except ValidationError as err:
        first = err.errors()[0]
        raise DataError.at(label, line, format_loc(first["loc"]), first["msg"] + origin) from None
    if field := _bad_utf8_field(example.model_dump()):  # e.g. a lone surrogate from a `\ud800` escape
        raise DataError.at(label, line, field, "invalid UTF-8" + origin)
    roles = [m.role for m in example.messages]
    if "user" not in roles:
        raise DataError.at(label, line, "messages", "needs a user turn" + origin)
    if example.role in CHAT_ROLES and roles[-1] != "assistant":
        raise DataError.at(label, line, f"messages[{len(roles) - 1}].role",
                           f"{example.role} examples end with the assistant's reply{origin}")
    if example.role in EVAL_ROLES and "assistant" in roles:
        raise DataError.at(label, line, f"messages[{roles.index('assistant')}].role",
                           f"{example.role} examples hold only the prompt{origin}")
    if example.role == "eval_utility" and not example.answer:
        raise DataError.at(label, line, "answer", f"eval_utility examples need the exact answer{origin}")
    sizes = [len(m.content) for m in example.messages]
    total = sum(sizes) + len(example.answer or "")
    if max_chars is not None and total > max_chars:
        raise DataError.at(label, line, f"messages[{sizes.index(max(sizes))}].content",
                           f"record has {total} characters, more than max_chars={max_chars}{origin}")
    return example.model_dump()


def validate_examples(examples: Sequence[Mapping], label: str, role: str | None = None,
                      max_chars: int | None = None, lines: Sequence[int] | None = None) -> list[dict]:
    """Check every example against the schema, its role and the size limit; ids must be unique.

    Args:
        examples: the role's examples in file order.
        label: the file name used in error messages, e.g. `data/finetune.jsonl`.
        role: the role every example must declare (None: any).
        max_chars: the limit on all message contents plus the answer of one record.
        lines: the line number of each example in `label` (default: 1, 2, ...).

    Returns:
        The examples as plain dicts in the canonical shape.
    """
    out, seen = [], {}
    for line, obj in zip(lines or range(1, len(examples) + 1), examples, strict=True):
        example = _check_example(obj, label, line, max_chars)
        if role is not None and example["role"] != role:
            raise DataError.at(label, line, "role", f"expected {role!r}, got {example['role']!r}")
        if example["id"] in seen:
            raise DataError.at(label, line, "id",
                               f"duplicate id {example['id']!r} (first on line {seen[example['id']]})")
        seen[example["id"]] = line
        out.append(example)
    return out


def load_role(data_dir: str | Path, role: str) -> list[dict]:
    """The validated examples of `<data_dir>/<role>.jsonl` (an empty file gives an empty list)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    path = Path(data_dir) / f"{role}.jsonl"
    records = list(read_jsonl(path))
    return validate_examples([obj for _, obj in records], str(path), role, lines=[n for n, _ in records])


def check_leakage(roles: Mapping[str, Sequence[Mapping]], where: str | Path = "data") -> None:
    """Raise when a normalized prompt of a training role also appears in a held-out role.

    Held out are the evaluation roles and `sv_val`; prompts are compared after `normalize_prompt`.
    """
    held: dict[str, tuple[str, int]] = {}
    for role in HELD_OUT_ROLES:
        for line, ex in enumerate(roles.get(role, ()), 1):
            held.setdefault(normalize_prompt(prompt_text(ex)), (role, line))
    leaks = [(role, line, ex, held[key])
             for role in TRAIN_ROLES for line, ex in enumerate(roles.get(role, ()), 1)
             if (key := normalize_prompt(prompt_text(ex))) and key in held]
    if leaks:
        role, line, ex, (other, other_line) = leaks[0]
        field = f"messages[{next(i for i, m in enumerate(ex['messages']) if m['role'] == 'user')}].content"
        more = f"; {len(leaks) - 1} more leaked prompts" if len(leaks) > 1 else ""
        raise DataError.at(f"{where}/{role}.jsonl", line, field,
                           f"prompt also in {where}/{other}.jsonl:{other_line} (source {ex.get('source')}): "
                           f"{prompt_text(ex)[:80]!r}{more}")
