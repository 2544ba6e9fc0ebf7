"""MovieLens-100k conversion against the files in the recbole wheel."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from core.settings import Settings
from streams.movielens import MEMBER, convert, read_events, recbole_wheel


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int], Path]:
    settings = Settings()
    out = tmp_path_factory.mktemp("ml")
    return out, convert(out, settings), recbole_wheel(settings)


def test_counts_match_the_files(converted) -> None:
    _, counts, wheel = converted
    with zipfile.ZipFile(wheel) as zf:
        rows = zf.read(MEMBER.format("inter")).decode().splitlines()[1:]
    high = sum(1 for row in rows if float(row.split("\t")[2]) >= 4)
    assert counts == {"items": 1682, "users": 943, "impressions": 100_000, "engagements": high}
    assert 50_000 < high < 60_000


def test_events_come_in_event_time_order_with_catalogue_first(converted) -> None:
    out, counts, _ = converted
    events = list(read_events(out))
    assert len(events) == sum(counts.values())
    assert all(a.ts <= b.ts for a, b in zip(events, events[1:]))
    assert {e.kind for e in events[: counts["items"] + counts["users"]]} == {"items", "users"}
    toy_story = next(e for e in events if e.kind == "items" and e.item_id == "1")
    assert toy_story.features == {"title": "Toy Story", "genres": "Animation, Children's, Comedy", "year": 1995}


def test_every_engagement_has_its_impression(converted) -> None:
    out, _, _ = converted
    events = list(read_events(out))
    shown = {(e.user_id, e.item_id, e.ts) for e in events if e.kind == "impressions"}
    assert all((e.user_id, e.item_id, e.ts) in shown for e in events if e.kind == "engagements")
