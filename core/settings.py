"""The one settings object: environment variables prefixed ``ONETOWER_``, overridable by CLI flags."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")  # what Kafka allows
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "onetower"  # Kafka jars, datasets, converted models
MATRYOSHKA_WIDTHS = (512, 256, 128, 64)  # the default prefixes of an embedding trained and served


class Settings(BaseSettings):
    """Addresses, topics, model and state locations for every part of onetower."""

    model_config = SettingsConfigDict(env_prefix="ONETOWER_", env_file=".env", extra="ignore")

    # Where the local stack keeps data and logs, and where heavy downloads are cached.
    state_dir: Path = Field(default=Path.home() / ".onetower", description="data and logs of the local stack")
    cache_dir: Path = Field(default=DEFAULT_CACHE_DIR, description="Kafka jars and other downloads")

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_controller_port: int = 9093
    kafka_version: str = "3.9.1"
    kafka_heap: str = "512m"
    topic_prefix: str = "onetower."
    topic_partitions: int = Field(default=4, ge=1)
    topic_retention_ms: int = Field(default=-1, description="-1 keeps impressions and engagements forever (training reads them)")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_ssl_cafile: Path | None = Field(default=None, description="CA bundle that signed the brokers' certificates (default: the system's)")

    # Redis: a password may be in the URL (redis://:PASSWORD@host) or apart (redis_password); logs show
    # redis_url_masked only.
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    redis_password: SecretStr = SecretStr("")
    redis_key_prefix: str = Field(default="ot:", description="start of every key (no braces: keys carry a hash tag after it)")
    redis_cluster: bool = Field(default=False, description="redis_url names one node of a Redis Cluster (the local stack "
                                "then runs three nodes, on redis_url's port and the next two)")
    redis_shards: int = Field(default=16, ge=1, le=16384, description="shards the state is split into, one hash slot each (a "
                              "script touches one shard); fixed for the life of a keyspace: changing it strands the state")

    # Milvus: an http(s) URI is a server; a path ending in .db is Milvus Lite (one process only).
    milvus_uri: str = "http://127.0.0.1:19530"
    milvus_token: str = Field(default="", repr=False, description="user:password or an API key, when Milvus has auth on")
    milvus_prefix: str = Field(default="", description="prefix of collection and alias names (tests isolate with it)")
    milvus_timeout_s: float = Field(default=5.0, gt=0, description="connect and per-call timeout; past it Milvus counts as down")
    milvus_read_consistency: Literal["Strong", "Session", "Bounded", "Eventually"] = Field(
        default="Bounded", description="consistency of serving reads (Strong waits 200-400 ms a search on Milvus 2.3)")
    hnsw_m: int = Field(default=16, ge=4, le=64)
    hnsw_ef_construction: int = Field(default=200, ge=8)
    hnsw_ef: int = Field(default=256, ge=1, description="search-time ef; raised to the result count when that is larger")
    reindex_batch: int = Field(default=256, ge=1, description="entities encoded and upserted per re-index step")
    reindex_sample: int = Field(default=32, ge=1, description="vectors re-encoded and compared before the alias swap")
    reindex_grace_s: int = Field(default=24 * 3600, ge=0, description="how long the previous version is kept for rollback")

    # Model
    model_dir: Path | None = Field(default=None, description="a model artifact directory (models/ format)")
    base_model: str = Field(default="minilm", description="HF name or path, or 'minilm' / 'smollm2' (offline packages)")
    embedding_dim: int = Field(default=512, ge=8)
    max_seq_length: int = Field(default=256, ge=16)
    matryoshka_widths: list[int] = Field(default=list(MATRYOSHKA_WIDTHS), description="Matryoshka widths (a prefix of the embedding each); those above embedding_dim are dropped")

    # Streams
    history_len: int = Field(default=50, ge=1, description="positive items kept per user")
    dedup_ttl_s: int = Field(default=7 * 24 * 3600, ge=1, description="how long an event id is remembered")
    refresh_batch: int = Field(default=64, ge=1, description="most entities re-encoded in one micro-batch")
    refresh_debounce_s: float = Field(default=0.5, ge=0.0, description="wait after a change before re-encoding")
    worker_metrics_port: int = 9108
    recent_impressions_len: int = Field(default=100, ge=1, description="recent impressions kept per user (features, debugging)")
    refresh_lease_s: float = Field(default=30.0, gt=0.0, description="a popped dirty entity returns to the queue if not acknowledged within this")
    percentile_refresh_s: float = Field(default=300.0, gt=0.0, description="how often the worker refits the popularity percentile tables")
    bucket_hysteresis: int = Field(default=5, ge=1, le=100, description="an item is re-encoded for its counters when one "
                                   "of its percentile buckets moved by this many points since it was last queued (1: every move)")
    incremental_users: bool = Field(default=False, description="re-encode users through cached keys/values when the served "
                                    "tower is causal (models/incremental.py); items and bidirectional towers keep the full path")
    incremental_items: bool = Field(default=False, description="with incremental_users, items too: a counter change "
                                    "recomputes the tokens from the first changed counter on, after the cached features")
    incremental_cache_bytes: int | None = Field(default=None, ge=1, description="bound of that cache [default: an eighth of the machine's memory]")
    incremental_kv_dtype: Literal["float32", "float16"] = Field(default="float16", description="keys/values as cached (float16: half the bytes of float32, and as exact: min cosine 1.000000 against the full encode)")
    live_recall_sample_rate: float = Field(default=0.1, ge=0.0, le=1.0, description="share of engagements scored for live recall (0: off)")
    live_recall_max_per_s: float = Field(default=50.0, gt=0.0, description="most engagements a worker scores a second (bounds the CPU scoring takes)")

    # Serving
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    candidates_max_k: int = Field(default=2000, ge=1, le=16384, description="largest k a candidates request may ask for")
    api_token: SecretStr = Field(default=SecretStr(""), description="bearer token the candidates routes require (empty: open)")

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_topic_safe(cls, v: str) -> str:
        if not set(v) <= TOPIC_CHARS:
            raise ValueError("topic_prefix may hold only letters, digits, '.', '_' and '-'")
        return v

    @field_validator("redis_key_prefix")
    @classmethod
    def _prefix_has_no_hash_tag(cls, v: str) -> str:
        if "{" in v or "}" in v:
            raise ValueError("redis_key_prefix may not hold '{' or '}': the shard's hash tag follows it")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, v: str) -> str:
        if urlparse(v).scheme not in {"redis", "rediss", "unix"}:
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return v

    @model_validator(mode="after")
    def _sasl_has_credentials(self) -> "Settings":
        if self.kafka_security_protocol.startswith("SASL_") and not (self.kafka_sasl_username and self.kafka_sasl_password.get_secret_value()):
            raise ValueError(f"kafka_security_protocol {self.kafka_security_protocol} needs kafka_sasl_username and kafka_sasl_password")
        return self

    def kafka_client_config(self) -> dict[str, Any]:
        """Address and security arguments for every kafka-python client (``KafkaConsumer(**settings.kafka_client_config(), ...)``):
        one place, so no client can connect without the credentials."""
        config: dict[str, Any] = {"bootstrap_servers": self.kafka_bootstrap, "security_protocol": self.kafka_security_protocol}
        if self.kafka_security_protocol.startswith("SASL_"):
            config.update(sasl_mechanism=self.kafka_sasl_mechanism, sasl_plain_username=self.kafka_sasl_username,
                          sasl_plain_password=self.kafka_sasl_password.get_secret_value())
        if self.kafka_security_protocol.endswith("SSL") and self.kafka_ssl_cafile:
            config["ssl_cafile"] = str(self.kafka_ssl_cafile)
        return config

    @property
    def redis_url_masked(self) -> str:
        """``redis_url`` with any password replaced by ``***``: the form for logs and error messages."""
        parts = urlparse(self.redis_url)
        if not parts.password:
            return self.redis_url
        user = f"{parts.username}:" if parts.username else ":"
        return parts._replace(netloc=f"{user}***@{parts.netloc.rsplit('@', 1)[1]}").geturl()

    def topic(self, kind: str) -> str:
        """Full topic name of a topic kind. Which kinds exist is the event registry's business
        (``streams.events.EVENT_TYPES``, a layer above): here a kind only has to be a safe name."""
        if not kind or not set(kind) <= TOPIC_CHARS:
            raise ValueError(f"topic kind {kind!r} is not a name of letters, digits, '.', '_' and '-'")
        return f"{self.topic_prefix}{kind}"

    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap.rsplit(":", 1)[1])

    @property
    def redis_port(self) -> int:
        return urlparse(self.redis_url).port or 6379

    @property
    def milvus_is_lite(self) -> bool:
        return not self.milvus_uri.startswith(("http://", "https://", "tcp://"))

    @property
    def milvus_port(self) -> int:
        return urlparse(self.milvus_uri).port or 19530

    @property
    def kafka_home(self) -> Path:
        return self.cache_dir / f"kafka-{self.kafka_version}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process (CLI flags update this object)."""
    return Settings()
