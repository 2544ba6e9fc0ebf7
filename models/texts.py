"""The one place that turns Redis state into tower input texts (re-index, stream refresher, serving, training).

Items: catalogue features plus popularity counters written as percentile buckets 1-100 through the
store's PercentileTables (counters without a fitted table yet are left out). Users: profile plus the
features of their engaged items, oldest first, fitted into the encoder's token budget when a
tokenizer and ``max_tokens`` are given. ``None`` marks an entity that has nothing to encode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from models.errors import RenderError
from models.render import Tokenizer, render_item, render_user
from streams.counters import PercentileTable

if TYPE_CHECKING:
    from streams.state import ItemState, StateStore, UserState


def counter_buckets(counters: Mapping[str, int], tables: Mapping[str, PercentileTable]) -> dict[str, int]:
    """Each counter's percentile bucket 1-100; counters whose table is not fitted yet are left out."""
    return {name: tables[name].bucket(count) for name, count in counters.items() if name in tables}


def item_text(features: Mapping[str, Any], counters: Mapping[str, int] | None = None,
              tables: Mapping[str, PercentileTable] | None = None) -> str:
    """One item's text from its features and raw counters (bucketed through ``tables``)."""
    return render_item(features, counter_buckets(counters or {}, tables or {}))


def item_state_texts(states: Sequence[ItemState | None],
                     tables: Mapping[str, PercentileTable]) -> list[str | None]:
    """Texts of item states; None for an item that is unknown, deleted, or has counts but no features
    yet (its catalogue event has not arrived)."""
    return [item_text(st.features, st.counters, tables) if st and st.features and not st.deleted else None
            for st in states]


def item_texts(store: StateStore, ids: Sequence[str],
               tables: Mapping[str, PercentileTable] | None = None) -> list[str | None]:
    """Texts of items in ``ids`` order (see ``item_state_texts``); ``tables`` default to the store's."""
    return item_state_texts(store.items(ids), store.percentile_tables() if tables is None else tables)


def _renders(features: Mapping[str, Any]) -> bool:
    try:
        render_item(features, {})
    except RenderError:
        return False
    return True


def _features_by_id(store: StateStore, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Features of the known, non-deleted items among ``item_ids`` (one Redis round trip); an item whose
    features cannot be rendered (quarantined on its own) is left out of histories rather than poisoning
    every user who engaged with it."""
    unique = list(dict.fromkeys(item_ids))
    return {st.item_id: st.features for st in store.items(unique)
            if st and st.features and not st.deleted and _renders(st.features)}


def user_text(store: StateStore, profile: Mapping[str, Any], history: Sequence[str], *,
              tokenizer: Tokenizer | None = None, max_tokens: int | None = None) -> str:
    """Text of a user given by value (POST /v1/candidates): profile features and engaged item ids,
    oldest first; items the store does not know are skipped."""
    features = _features_by_id(store, history)
    return render_user(profile, [features[i] for i in history if i in features], tokenizer=tokenizer, max_tokens=max_tokens)


def user_state_texts(store: StateStore, states: Sequence[UserState | None], *, tokenizer: Tokenizer | None = None,
                     max_tokens: int | None = None) -> list[str | None]:
    """Texts of user states (history item features read from ``store``); None for a user with no state."""
    features = _features_by_id(store, [h.item_id for st in states if st for h in st.history])
    return [render_user(st.profile, [features[h.item_id] for h in st.history if h.item_id in features],
                        tokenizer=tokenizer, max_tokens=max_tokens) if st else None
            for st in states]


def user_texts(store: StateStore, ids: Sequence[str], *, tokenizer: Tokenizer | None = None,
               max_tokens: int | None = None) -> list[str | None]:
    """Texts of users in ``ids`` order from their stored profile and history (see ``user_state_texts``)."""
    return user_state_texts(store, store.users(ids), tokenizer=tokenizer, max_tokens=max_tokens)
