"""Item and user text with one added marker token per field, as in LinkedIn's retrieval paper.

Format (version ``PROMPT_FORMAT_VERSION``), with no separator between fields because every marker is
one special token and a space before it would cost a token in byte-level BPE vocabularies::

    item: [ITEM][TITLE] Toy Story (1995)[GENRES] Animation|Children's|Comedy[YEAR] 1995[IMPRESSIONS_24H][PCT] 87[/PCT]
    user: [USER][AGE] 24[GENDER] M[OCCUPATION] technician[HISTORY][ITEM][TITLE] ...[ITEM][TITLE] ...

Known feature names get their own marker ``[NAME]`` and come in a declared order; any other feature is
written as ``[FIELD] name: value`` after them, sorted by name, so the marker set stays fixed
(``MARKER_TOKENS``) and the same input always gives the same text. Counters are popularity
percentile buckets 1-100 wrapped in ``[PCT]...[/PCT]`` (the paper's best format) or, for the
ablation, raw counts after the counter's marker. Marker strings inside values are removed, so a
title cannot forge a field. A user's history is the positively engaged items, oldest first; when the
text would overflow the token budget the oldest items are dropped.

Append-only rule (``models/incremental.py`` relies on it): nothing is rendered after the history, and
every history entry starts with the ``[ITEM]`` special token, at which tokenizers split. So the tokens
of a user's text with one more entry start with the tokens of the text before it, token for token
(BOS at the start only; LLaMA-style tokenizers append no EOS). The rule breaks, by design, when the
profile changes or the token budget drops the oldest entries; the incremental encoder then encodes in full.

History blocks (``history_block``, a model's property): dropping one oldest entry per new one would
break the rule at every engagement once a history fills the budget. With blocks of B entries the kept
history starts at an entry whose number (from the user's first engagement, ``history_offset`` + its
position) is a multiple of B, so the start moves B entries at once and the next appends are pure again:
one full encode per B engagements, at the cost of (B-1)/2 fewer entries in the text on average. A
number, not a position in the capped history, so the history cap dropping an entry shifts nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import numpy as np

from models.errors import RenderError
from streams.counters import COUNTER_NAMES

PROMPT_FORMAT_VERSION = "1"
HISTORY_BLOCK_CAUSAL = 8  # a causal tower's history is trimmed 8 entries at a time (see History blocks above)

Value = str | int | float | bool
ITEM_FIELDS = ("title", "name", "type", "category", "author", "genres", "tags", "year", "language", "description", "text")
USER_FIELDS = ("age", "gender", "occupation", "location", "zip", "language", "headline", "interests")
COUNTER_FIELDS = COUNTER_NAMES  # the counters the state keeps are the ones the prompt can carry
STRUCTURE_MARKERS = ("[ITEM]", "[USER]", "[HISTORY]", "[FIELD]", "[PCT]", "[/PCT]")


def marker(name: str) -> str:
    """The marker token of a known feature or counter name."""
    return f"[{name.upper()}]"


MARKER_TOKENS: list[str] = [
    *STRUCTURE_MARKERS,
    *(marker(name) for name in dict.fromkeys(ITEM_FIELDS + USER_FIELDS + COUNTER_FIELDS)),
]
_MARKER_RE = re.compile("|".join(re.escape(m) for m in sorted(MARKER_TOKENS, key=len, reverse=True)), re.IGNORECASE)
_SPACE_RE = re.compile(r"\s+")


class Tokenizer(Protocol):
    """What ``render_user`` needs of a tokenizer (any Hugging Face tokenizer has it)."""

    def __call__(self, text: list[str], *, add_special_tokens: bool) -> Mapping[str, list[list[int]]]: ...


def _value_text(name: str, value: Value) -> str:
    """One value as prompt text: whitespace collapsed, marker strings removed."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RenderError(f"feature {name!r} is {value}; only finite numbers can be rendered")
        return f"{value:g}"
    if isinstance(value, str):
        return _SPACE_RE.sub(" ", _MARKER_RE.sub(" ", value)).strip()
    raise RenderError(f"feature {name!r} has a {type(value).__name__}; expected text, a number or a bool")


def _fields(features: Mapping[str, Value | None], known: Sequence[str]) -> str:
    """Known fields in declared order, then the others sorted by name; empty values are left out."""
    lowered = {str(k).lower(): v for k, v in features.items()}
    names = [n for n in known if n in lowered] + sorted(n for n in lowered if n not in known)
    parts = []
    for name in names:
        if lowered[name] is None or not (text := _value_text(name, lowered[name])):
            continue
        head = marker(name) if name in known else f"[FIELD] {_value_text('name', name)}:"
        parts.append(f"{head} {text}")
    return "".join(parts)


def _counters(counters: Mapping[str, int], mode: Literal["bucket", "raw"]) -> str:
    parts = []
    for name in sorted(counters, key=lambda n: (COUNTER_FIELDS.index(n) if n in COUNTER_FIELDS else len(COUNTER_FIELDS), n)):
        count = counters[name]
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
            raise RenderError(f"counter {name!r} is {count!r}; expected an integer")
        if mode == "bucket" and not 1 <= count <= 100:
            raise RenderError(f"counter {name!r} is {count}; bucket mode expects a percentile bucket 1-100 (map counts with PercentileTable)")
        if mode == "raw" and count < 0:
            raise RenderError(f"counter {name!r} is {count}; counts cannot be negative")
        head = marker(name) if name in COUNTER_FIELDS else f"[FIELD] {_value_text('name', name)}:"
        parts.append(f"{head}[PCT] {count}[/PCT]" if mode == "bucket" else f"{head} {count}")
    return "".join(parts)


def render_item(
    features: Mapping[str, Value],
    counters: Mapping[str, int] | None = None,
    *,
    counts_mode: Literal["bucket", "raw"] = "bucket",
) -> str:
    """Item text: its features, then its popularity counters (buckets 1-100, or raw counts)."""
    if counts_mode not in ("bucket", "raw"):
        raise RenderError(f"counts_mode is {counts_mode!r}; expected 'bucket' or 'raw'")
    return "[ITEM]" + _fields(features, ITEM_FIELDS) + _counters(counters or {}, counts_mode)


def render_user(
    profile: Mapping[str, Value],
    history: Sequence[Mapping[str, Value]],
    *,
    tokenizer: Tokenizer | None = None,
    max_tokens: int | None = None,
    history_block: int = 1,
    history_offset: int = 0,
) -> str:
    """User text: profile, then engaged items oldest first, the most recent kept within ``max_tokens``.

    ``max_tokens`` counts the tokenizer's own special tokens too, so pass the encoder's
    ``max_seq_length`` and nothing is truncated away by the model (which would cut the newest items).
    A trimmed history starts at a multiple of ``history_block`` (entries numbered from
    ``history_offset``, see the module's docstring) when the budget holds more than a block.
    """
    if history_block < 1 or history_offset < 0:
        raise RenderError(f"history_block must be >= 1 and history_offset >= 0, got {history_block} and {history_offset}")
    head = "[USER]" + _fields(profile, USER_FIELDS)
    items = [render_item(features) for features in history]
    if not items:
        return head
    head += "[HISTORY]"
    if max_tokens is None:
        return head + "".join(items)
    if tokenizer is None:
        raise RenderError("render_user needs a tokenizer to fit the history into max_tokens")
    budget = max_tokens - len(tokenizer([head], add_special_tokens=True)["input_ids"][0])
    lengths = [len(ids) for ids in tokenizer(items, add_special_tokens=False)["input_ids"]]
    keep = 0
    while keep < len(items) and lengths[-keep - 1] <= budget:
        budget -= lengths[-keep - 1]
        keep += 1
    keep = _block_aligned(len(items), keep, history_block, history_offset)
    while True:  # the per-piece sum is exact for marker-delimited pieces; re-check the whole text anyway
        text = head + "".join(items[len(items) - keep :])
        if keep == 0 or len(tokenizer([text], add_special_tokens=True)["input_ids"][0]) <= max_tokens:
            return text
        keep -= 1


def _block_aligned(total: int, keep: int, block: int, offset: int) -> int:
    """How many of the newest ``total`` entries to keep when at most ``keep`` fit: all of them, or the
    entries from the first block start (entry number ``offset + position``, a multiple of ``block``)
    among those that fit; ``keep`` itself when no block start is among them."""
    if keep == total:
        return keep
    start = total - keep
    start += -(offset + start) % block
    return total - start if start < total else keep
