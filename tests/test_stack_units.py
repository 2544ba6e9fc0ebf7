"""The local stack's pure parts (no server started)."""

from __future__ import annotations

import base64
import re

from onetower.stack import kafka_cluster_id


def test_kafka_cluster_ids_are_never_read_as_a_flag() -> None:
    """One urlsafe base64 uuid in 64 begins with '-', which ``StorageTool format -t`` reads as a flag."""
    ids = [kafka_cluster_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) for i in ids)
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)
    assert len(set(ids)) == len(ids)
