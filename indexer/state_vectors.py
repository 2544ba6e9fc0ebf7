"""The one state-to-vector path: state -> text -> vector -> store.

The refresher (dirty entities), re-index (every entity) and the API's cold start (one user without a
vector) all go through these functions, and training renders its examples through the same
``models.texts`` functions from the reference state, so a vector is made the same way wherever it is
made: the text from the state and the percentile tables, the vector from the version's encoder, and
the scalar fields stored with it (``updated_at``, ``attrs``) from the same state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from indexer.vectors import VectorStore
from models.texts import item_state_texts, user_state_texts
from streams.counters import PercentileTable
from streams.state import ItemState, Kind, UserState

if TYPE_CHECKING:
    from models.encoder import Encoder
    from streams.rules import StateReader

State = ItemState | UserState


def entity_id(state: State) -> str:
    return state.item_id if isinstance(state, ItemState) else state.user_id


def texts(kind: Kind, states: Sequence[State | None], reader: "StateReader", tables: Mapping[str, PercentileTable],
          encoder: "Encoder") -> list[str | None]:
    """The tower input of each state (None: nothing to encode), fitted to the encoder's token budget."""
    if kind == "items":
        return item_state_texts(states, tables)  # type: ignore[arg-type]
    return user_state_texts(reader, states, tokenizer=encoder.tokenizer, max_tokens=encoder.max_seq_length,  # type: ignore[arg-type]
                            history_block=encoder.history_block)


def fields(state: State) -> dict[str, Any]:
    """The scalar fields stored with a vector: the event time it reflects, and the attributes filters see."""
    attrs = state.features if isinstance(state, ItemState) else state.profile
    return {"updated_at": max(state.updated_ms, 0), "attrs": dict(attrs)}


def upsert(index: VectorStore, version: str, kind: Kind, states: Sequence[State], vectors: np.ndarray) -> int:
    """Write the vectors of ``states`` (row for row) with their fields into ``version``."""
    write = index.upsert_items if kind == "items" else index.upsert_users
    return write(version, [entity_id(st) for st in states], vectors, [fields(st) for st in states])


def delete(index: VectorStore, version: str, kind: Kind, ids: Sequence[str]) -> None:
    """Remove the vectors of entities that have no text any more (no state, or a deleted item)."""
    if ids:
        (index.delete_items if kind == "items" else index.delete_users)(version, ids)
