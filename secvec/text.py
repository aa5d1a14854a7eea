"""The text normalisers: the one form each comparison of texts is made in."""

from __future__ import annotations

import unicodedata

# Curly and typographic quotes -> ASCII; real refusals are often written "I’m sorry".
_QUOTES = str.maketrans({c: "'" for c in "\u2018\u2019\u201a\u201b\u2032\u02bc\u00b4`"}
                        | {c: '"' for c in "\u201c\u201d\u201e\u201f\u2033"})


def fold(text: str) -> str:
    """Case-folded, whitespace collapsed: exact answers and duplicate replies are compared in this form."""
    return " ".join(text.casefold().split())


def normalize_reply(text: str) -> str:
    """NFKC, ASCII quotes, then `fold`: the form every judge rule matches against."""
    return fold(unicodedata.normalize("NFKC", text).translate(_QUOTES))


def normalize_prompt(text: str) -> str:
    """NFKC, punctuation stripped, then `fold`: prompts are the same prompt in this form (leakage, dedup)."""
    text = unicodedata.normalize("NFKC", text).casefold()  # before stripping, as prompts were always keyed
    return fold("".join(c for c in text if not unicodedata.category(c).startswith("P")))
