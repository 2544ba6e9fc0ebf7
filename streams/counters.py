"""Item popularity counters over event time, defined once for the stream workers and for training.

Counts are kept in hour buckets; a window's count at time t is the sum of the buckets of the last
``hours`` hours up to and including t's hour. Online (Redis) and offline (point-in-time training)
use these same functions, so a model sees the same counter values in training and in serving.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

BUCKET_MS = 3600 * 1000
WINDOWS_H: dict[str, int] = {"1h": 1, "24h": 24, "7d": 24 * 7}
SIGNALS = ("impressions", "engagements")
COUNTER_NAMES = tuple(f"{signal}_{window}" for signal in SIGNALS for window in WINDOWS_H)
MAX_WINDOW_H = max(WINDOWS_H.values())


def hour_bucket(ts_ms: int) -> int:
    """The hour bucket an event at ``ts_ms`` falls into."""
    return ts_ms // BUCKET_MS


def window_counts(buckets: dict[int, int], now_ms: int, prefix: str) -> dict[str, int]:
    """Counts of one signal for every window, from its hour buckets, as of ``now_ms``."""
    now = hour_bucket(now_ms)
    return {
        f"{prefix}_{name}": sum(n for b, n in buckets.items() if now - hours < b <= now)
        for name, hours in WINDOWS_H.items()
    }


class PointInTimeCounters:
    """Offline counterpart of the Redis counters: feed events in time order, read counts as of now."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, signal: str, item_id: str, ts_ms: int) -> None:
        self._buckets[(signal, item_id)][hour_bucket(ts_ms)] += 1

    def counts(self, item_id: str, now_ms: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for signal in SIGNALS:
            out.update(window_counts(self._buckets.get((signal, item_id), {}), now_ms, signal))
        return out

    def prune(self, now_ms: int, item_ids: Iterable[str] | None = None) -> None:
        """Drop buckets older than the longest window (keeps memory bounded on long replays)."""
        horizon = hour_bucket(now_ms) - MAX_WINDOW_H
        for key, buckets in self._buckets.items():
            if item_ids is None or key[1] in item_ids:
                for b in [b for b in buckets if b <= horizon]:
                    del buckets[b]
