"""MovieLens-100k as onetower events, from the files that the ``recbole`` wheel ships.

Only the data files are taken from the wheel (it is downloaded with ``pip download --no-deps``,
never installed). Mapping (docs/DESIGN.md, Training): every rating is an impression; a rating of 4 or 5
is also an engagement; catalogue and profile events come first, at the data set's first second.
"""

from __future__ import annotations

import heapq
import subprocess
import sys
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from core.errors import OnetowerError
from core.settings import Settings
from streams.events import EVENT_TYPES, EngagementEvent, Event, ImpressionEvent, ItemEvent, UserEvent

RECBOLE = "recbole==1.2.1"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
ENGAGED_RATING = 4


class MovieLensError(OnetowerError):
    """The data set could not be fetched, read or replayed; the message says why."""


def recbole_wheel(settings: Settings) -> Path:
    """The recbole wheel in the cache directory, downloaded once (no dependencies, not installed)."""
    cache = settings.cache_dir / "wheels"
    found = sorted(cache.glob("recbole-*.whl"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), RECBOLE],
                          capture_output=True, text=True)
    found = sorted(cache.glob("recbole-*.whl"))
    if proc.returncode != 0 or not found:
        raise MovieLensError(f"could not download {RECBOLE} from PyPI: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    return found[-1]


def _read_atomic(zf: zipfile.ZipFile, ext: str) -> list[dict[str, str]]:
    """Rows of a recbole atomic file (tab-separated, header 'name:type')."""
    lines = zf.read(MEMBER.format(ext)).decode("latin-1").splitlines()
    header = [col.split(":")[0] for col in lines[0].split("\t")]
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line]


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def events_from_wheel(wheel: Path) -> dict[str, list[Event]]:
    """All events per topic kind, in the application order of kinds, each list in event-time order
    (kinds MovieLens has no events of are left out)."""
    with zipfile.ZipFile(wheel) as zf:
        ratings = _read_atomic(zf, "inter")
        items = _read_atomic(zf, "item")
        users = _read_atomic(zf, "user")
    ratings.sort(key=lambda r: (float(r["timestamp"]), r["user_id"], r["item_id"]))
    start = _ts(float(ratings[0]["timestamp"]) - 1)
    events: list[Event] = []
    for row in items:
        features: dict[str, str | int] = {"title": row["movie_title"].strip(), "genres": ", ".join(row["class"].split())}
        if row.get("release_year", "").strip().isdigit():
            features["year"] = int(row["release_year"])
        events.append(ItemEvent(event_id=f"ml100k:item:{row['item_id']}", ts=start, item_id=row["item_id"], features=features))
    for row in users:
        features = {"age": int(row["age"]), "gender": row["gender"], "occupation": row["occupation"], "zip": row["zip_code"]}
        events.append(UserEvent(event_id=f"ml100k:user:{row['user_id']}", ts=start, user_id=row["user_id"], features=features))
    for row in ratings:
        uid, iid, ts = row["user_id"], row["item_id"], _ts(float(row["timestamp"]))
        ident = f"{uid}:{iid}:{int(float(row['timestamp']))}"
        events.append(ImpressionEvent(event_id=f"ml100k:imp:{ident}", ts=ts, user_id=uid, item_id=iid))
        if float(row["rating"]) >= ENGAGED_RATING:
            events.append(EngagementEvent(event_id=f"ml100k:eng:{ident}", ts=ts, user_id=uid, item_id=iid, kind_="rating"))
    by_kind = {kind: [e for e in events if e.kind == kind] for kind in EVENT_TYPES}
    return {kind: rows for kind, rows in by_kind.items() if rows}


def convert(out_dir: Path, settings: Settings) -> dict[str, int]:
    """Write ``<kind>.jsonl`` per topic kind into ``out_dir``; returns the event count per kind."""
    events = events_from_wheel(recbole_wheel(settings))
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, rows in events.items():
        with open(out_dir / f"{kind}.jsonl", "wb") as fh:
            for event in rows:
                fh.write(event.to_bytes() + b"\n")
    return {kind: len(rows) for kind, rows in events.items()}


def read_events(directory: Path) -> Iterator[Event]:
    """Every event of a converted directory, merged in event-time order, ties in the application order
    of kinds (catalogue first). A registered kind without a file has no events (the directory was
    written before the kind existed)."""
    paths = {kind: directory / f"{kind}.jsonl" for kind in EVENT_TYPES}
    present = [(rank, kind, path) for rank, (kind, path) in enumerate(paths.items()) if path.is_file()]
    if not present:
        raise MovieLensError(f"{directory} holds none of {', '.join(p.name for p in paths.values())}; "
                             f"write it with `onetower dataset movielens --out {directory}`")

    def stream(rank: int, kind: str, path: Path) -> Iterator[tuple[datetime, int, Event]]:
        cls = EVENT_TYPES[kind]
        with open(path, "rb") as fh:
            for line in fh:
                event = cls.model_validate_json(line)
                yield event.ts, rank, event

    merged = heapq.merge(*(stream(*p) for p in present), key=lambda t: (t[0], t[1]))
    for _, _, event in merged:
        yield event


def replay(directory: Path, settings: Settings, *, speed: float = 0.0, limit: int | None = None) -> dict[str, int]:
    """Send a converted directory to Kafka in event-time order, ``speed`` times faster than real time."""
    from rich.progress import Progress

    from streams.producer import EventProducer
    from streams.topics import ensure_topics

    ensure_topics(settings)
    counts = dict.fromkeys(EVENT_TYPES, 0)
    first_ts: datetime | None = None
    wall_start = time.monotonic()
    with EventProducer(settings) as producer, Progress(transient=True) as progress:
        task = progress.add_task("replaying", total=limit)
        for n, event in enumerate(read_events(directory)):
            if limit is not None and n >= limit:
                break
            if speed > 0:
                first_ts = first_ts or event.ts
                delay = (event.ts - first_ts).total_seconds() / speed - (time.monotonic() - wall_start)
                if delay > 0:
                    producer.flush()
                    time.sleep(delay)
            producer.send(event)
            counts[event.kind] += 1
            if n % 10_000 == 0:
                progress.update(task, completed=n)
        producer.flush()
    return counts


