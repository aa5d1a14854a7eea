"""Data preparation: the dataset contract and everything that builds, reads and versions the roles.

The package namespace holds the contract only (`schema`: roles, examples, loading, validation, leakage), so
that `secvec.config` can build on it; the builders import the configs and live in their own modules:

- `build`: `build_dataset`, the sole dataset writer (`write_dataset`: atomic, keys sorted, with manifest);
- `synthetic`: the embedded default world; `public`: the public files and the `public` preset;
- `sources`: the user's generic CSV / JSONL / TXT files; `files`: file helpers both share;
- `judge_corpus`: the harm judge's training replies; `versioning`: DVC and the dataset md5.
"""

from secvec.data.schema import (
    CHAT_ROLES,
    EVAL_ROLES,
    HELD_OUT_ROLES,
    ROLES,
    TRAIN_ROLES,
    DataError,
    Example,
    Manifest,
    Message,
    Role,
    chat,
    check_leakage,
    format_loc,
    load_role,
    normalize_prompt,
    prompt_text,
    read_jsonl,
    read_text,
    validate_examples,
)

__all__ = [
    "CHAT_ROLES",
    "EVAL_ROLES",
    "HELD_OUT_ROLES",
    "ROLES",
    "TRAIN_ROLES",
    "DataError",
    "Example",
    "Manifest",
    "Message",
    "Role",
    "chat",
    "check_leakage",
    "format_loc",
    "load_role",
    "normalize_prompt",
    "prompt_text",
    "read_jsonl",
    "read_text",
    "validate_examples",
]
