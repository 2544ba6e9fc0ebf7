"""Item popularity counters over event time, defined once for the stream workers and for training.

Counts are kept in hour buckets; a window's count at time t is the sum of the buckets of the last
``hours`` hours up to and including t's hour. Redis (``streams.state``) and the reference state that
training replays (``streams.rules``) read counters and fit percentile tables with these functions.
"""

from __future__ import annotations

import bisect
from typing import Iterable, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import OnetowerError

BUCKET_MS = 3600 * 1000
WINDOWS_H: dict[str, int] = {"1h": 1, "24h": 24, "7d": 24 * 7}
SIGNALS = ("impressions", "engagements")
COUNTER_NAMES = tuple(f"{signal}_{window}" for signal in SIGNALS for window in WINDOWS_H)
MAX_WINDOW_H = max(WINDOWS_H.values())


class CounterError(OnetowerError, ValueError):
    """A negative count, or a stored percentile table that is not one."""


def hour_bucket(ts_ms: int) -> int:
    """The hour bucket an event at ``ts_ms`` falls into."""
    return ts_ms // BUCKET_MS


def window_counts(buckets: Mapping[int, int], now_ms: int, prefix: str) -> dict[str, int]:
    """Counts of one signal for every window, from its hour buckets, as of ``now_ms``."""
    now = hour_bucket(now_ms)
    return {
        f"{prefix}_{name}": sum(n for b, n in buckets.items() if now - hours < b <= now)
        for name, hours in WINDOWS_H.items()
    }


def counters_as_of(buckets: Mapping[str, Mapping[int, int]], as_of_ms: int) -> dict[str, int]:
    """Every counter (``COUNTER_NAMES``) from each signal's hour buckets, as of ``as_of_ms``."""
    out: dict[str, int] = {}
    for signal in SIGNALS:
        out.update(window_counts(buckets.get(signal, {}), as_of_ms, signal))
    return out


def prune(buckets: dict[int, int], as_of_ms: int) -> None:
    """Drop the buckets outside every window as of ``as_of_ms`` (they can never be read again, since
    an item's counters are read as of its newest event time, which only grows)."""
    horizon = hour_bucket(as_of_ms) - MAX_WINDOW_H
    for b in [b for b in buckets if b <= horizon]:
        del buckets[b]


class PercentileTable(BaseModel):
    """Maps a raw count to its percentile bucket 1-100 among the counts it was fitted on.

    ``edges`` are the 1st..99th percentiles; a count's bucket is 1 + the number of edges below it, so
    the bucket says what share of items had fewer events (0 impressions stays in bucket 1 even when
    most items have none). An empty table (fitted on nothing yet) puts every count in bucket 1.
    """

    model_config = ConfigDict(frozen=True)

    edges: list[int] = Field(default_factory=list)
    n: int = Field(default=0, ge=0, description="how many counts the table was fitted on")

    @model_validator(mode="after")
    def _check(self) -> PercentileTable:
        if len(self.edges) not in (0, 99):
            raise ValueError(f"edges must hold 99 percentiles (or none), not {len(self.edges)}")
        if any(a > b for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError("edges must be non-decreasing")
        return self

    @classmethod
    def fit(cls, counts: Iterable[int]) -> PercentileTable:
        """The table of one population of counts (e.g. every item's 24 h impressions)."""
        values = np.fromiter(counts, dtype=np.int64)
        if values.size == 0:
            return cls()
        if values.min() < 0:
            raise CounterError("counts cannot be negative")
        edges = np.quantile(values, np.arange(1, 100) / 100, method="inverted_cdf")
        return cls(edges=[int(e) for e in edges], n=int(values.size))

    def bucket(self, count: int) -> int:
        """The percentile bucket 1-100 of ``count``."""
        if count < 0:
            raise CounterError(f"count {count} is negative")
        return 1 + bisect.bisect_left(self.edges, count)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, s: str | bytes) -> PercentileTable:
        try:
            return cls.model_validate_json(s)
        except ValidationError as exc:
            raise CounterError(f"not a percentile table: {exc.errors()[0]['msg']}") from None


def fit_tables(counters: Sequence[Mapping[str, int]]) -> dict[str, PercentileTable]:
    """One table per counter name, fitted on every item's counters (``counters_as_of``)."""
    return {name: PercentileTable.fit([c[name] for c in counters]) for name in COUNTER_NAMES}
