"""The one place that turns state into tower input texts (re-index, stream refresher, serving, training).

The state is any ``StateReader``: Redis (``StateStore``) when serving, the reference state that
training replays (``ReferenceState``), so the texts a model trains on are made as serving makes them.
Items: catalogue features plus popularity counters written as percentile buckets 1-100 through the
reader's PercentileTables (counters without a fitted table yet are left out; ``counts_mode="raw"``,
a training ablation, writes the counts). Users: profile plus the features of their engaged items,
oldest first, fitted into the encoder's token budget when a tokenizer and ``max_tokens`` are given.
``None`` marks an entity that has nothing to encode.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence, TypeGuard

from models.errors import RenderError
from models.render import Tokenizer, render_item, render_user
from streams.counters import PercentileTable
from streams.rules import ItemState, StateReader, UserState


def counter_buckets(counters: Mapping[str, int], tables: Mapping[str, PercentileTable]) -> dict[str, int]:
    """Each counter's percentile bucket 1-100; counters whose table is not fitted yet are left out."""
    return {name: tables[name].bucket(count) for name, count in counters.items() if name in tables}


CountsMode = Literal["bucket", "raw"]


def item_text(features: Mapping[str, Any], counters: Mapping[str, int] | None = None,
              tables: Mapping[str, PercentileTable] | None = None, counts_mode: CountsMode = "bucket") -> str:
    """One item's text from its features and raw counters (bucketed through ``tables``, or raw)."""
    counts = counter_buckets(counters or {}, tables or {}) if counts_mode == "bucket" else counters
    return render_item(features, counts, counts_mode=counts_mode)


def has_text(state: ItemState | None) -> TypeGuard[ItemState]:
    """False for an item that is unknown, deleted, or has counts but no features yet (its catalogue
    event has not arrived): it has nothing to encode."""
    return bool(state and state.features and not state.deleted)


def item_state_texts(states: Sequence[ItemState | None], tables: Mapping[str, PercentileTable],
                     counts_mode: CountsMode = "bucket") -> list[str | None]:
    """Texts of item states; None for an item without one (``has_text``)."""
    return [item_text(st.features, st.counters, tables, counts_mode) if has_text(st) else None for st in states]


def item_texts(reader: StateReader, ids: Sequence[str],
               tables: Mapping[str, PercentileTable] | None = None) -> list[str | None]:
    """Texts of items in ``ids`` order (see ``item_state_texts``); ``tables`` default to the reader's."""
    return item_state_texts(reader.items(ids), reader.percentile_tables() if tables is None else tables)


def _renders(features: Mapping[str, Any]) -> bool:
    try:
        render_item(features, {})
    except RenderError:
        return False
    return True


def _features_by_id(reader: StateReader, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Features of the items with a text among ``item_ids`` (one read, one Redis round trip); an item
    whose features cannot be rendered (quarantined on its own) is left out of histories rather than
    poisoning every user who engaged with it."""
    unique = list(dict.fromkeys(item_ids))
    return {st.item_id: st.features for st in reader.items(unique) if has_text(st) and _renders(st.features)}


def user_text(reader: StateReader, profile: Mapping[str, Any], history: Sequence[str], *,
              tokenizer: Tokenizer | None = None, max_tokens: int | None = None, history_block: int = 1) -> str:
    """Text of a user given by value (POST /v1/candidates): profile features and engaged item ids,
    oldest first (the user's whole history: its entries are numbered from 0); items the reader does not
    know are skipped."""
    features = _features_by_id(reader, history)
    return render_user(profile, [features[i] for i in history if i in features], tokenizer=tokenizer,
                       max_tokens=max_tokens, history_block=history_block)


def user_state_texts(reader: StateReader, states: Sequence[UserState | None], *, tokenizer: Tokenizer | None = None,
                     max_tokens: int | None = None, history_block: int = 1) -> list[str | None]:
    """Texts of user states (history item features read from ``reader``); None for a user with no state.
    History entries are numbered from the user's first engagement (``UserState.history_offset``)."""
    features = _features_by_id(reader, [h.item_id for st in states if st for h in st.history])
    return [render_user(st.profile, [features[h.item_id] for h in st.history if h.item_id in features],
                        tokenizer=tokenizer, max_tokens=max_tokens, history_block=history_block,
                        history_offset=st.history_offset) if st else None
            for st in states]


def user_texts(reader: StateReader, ids: Sequence[str], *, tokenizer: Tokenizer | None = None,
               max_tokens: int | None = None, history_block: int = 1) -> list[str | None]:
    """Texts of users in ``ids`` order from their profile and history (see ``user_state_texts``)."""
    return user_state_texts(reader, reader.users(ids), tokenizer=tokenizer, max_tokens=max_tokens,
                            history_block=history_block)
