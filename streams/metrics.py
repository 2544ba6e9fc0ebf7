"""Prometheus metrics of a stream worker (served on ``settings.worker_metrics_port``) and JSON logs."""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

EVENTS = Counter("onetower_events_total", "events consumed, by topic kind and outcome (applied, duplicate, invalid)",
                 ["topic", "outcome"])
DLQ = Counter("onetower_dlq_total", "records sent to the dead-letter topic, by source topic kind", ["topic"])
LAG = Gauge("onetower_consumer_lag", "records between the committed position and the end of a partition",
            ["topic", "partition"])
ENCODE_BATCH = Histogram("onetower_encode_batch_size", "entities encoded in one micro-batch", ["kind"],
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
ENCODE_SECONDS = Histogram("onetower_encode_seconds", "time to encode one micro-batch", ["kind"],
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
ENCODED = Counter("onetower_encoded_total", "entities encoded and upserted (or deleted), by kind", ["kind"])
FRESHNESS = Histogram("onetower_freshness_seconds", "event time of the state a vector reflects -> vector upserted",
                      ["kind"], buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 60, 120,
                                            300, 900, 3600, 86400, float("inf")))
DIRTY = Gauge("onetower_dirty_entities", "entities waiting or leased for re-encoding", ["kind"])
REDIS_ERRORS = Counter("onetower_redis_errors_total", "Redis calls that failed (and were retried)")
QUARANTINED = Counter("onetower_quarantined_total", "entities set aside because their re-encoding failed on their data",
                      ["kind"])
REFRESH_ERRORS = Counter("onetower_refresh_errors_total", "refresher steps that failed unexpectedly (retried)")
MILVUS_ERRORS = Counter("onetower_milvus_errors_total", "Milvus calls that failed (the batch is retried later)")
LIVE_RECALL = Gauge("onetower_live_recall", "share of scored engagements whose item ranked within k just before "
                    "(shared Redis windows), per model version, window, k and ranker (model, popularity)",
                    ["version", "window", "k", "ranker"])
LIVE_RECALL_WINDOW_SCORED = Gauge("onetower_live_recall_window_scored", "engagements scored within the window",
                                  ["version", "window"])
LIVE_RECALL_RANK = Histogram("onetower_live_recall_rank", "rank of the engaged item among the version's candidates "
                             "just before (101 = beyond 100)", ["version"], buckets=(1, 5, 10, 20, 50, 100, float("inf")))
LIVE_RECALL_VECTOR_LAG = Histogram("onetower_live_recall_vector_lag", "user state changes (engagements, profile updates) "
                                   "the scored user vector missed (0 = current)", ["version"],
                                   buckets=(0, 1, 2, 5, 10, 20, 50, float("inf")))
LIVE_RECALL_SCORED = Counter("onetower_live_recall_scored_total", "engagements scored by this worker, per version", ["version"])
LIVE_RECALL_SKIPPED = Counter("onetower_live_recall_skipped_total", "sampled engagements not scored, by reason "
                              "(seen, no_vector, rate, backlog)", ["reason"])
LIVE_RECALL_ERRORS = Counter("onetower_live_recall_errors_total", "live recall scoring failures (the events are applied)")
LIVE_RECALL_SECONDS = Histogram("onetower_live_recall_seconds", "time to score one engagement in every version",
                                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))


def serve(port: int) -> int:
    """Serve /metrics on ``port`` (0 = any free port, so workers on one machine do not collide); returns the port."""
    server, _thread = start_http_server(port)
    return server.server_port


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the ``extra`` fields given."""

    _standard = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in self._standard})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info") -> None:
    """JSON lines on stderr for every logger (faust's included)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
