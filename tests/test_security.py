"""Credentials: a password-protected redis-server (a private one of the local stack's kind), and the
Kafka security settings as each client library receives them."""

from __future__ import annotations

from typing import Iterator

import pytest
import redis
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import SecretStr, ValidationError

from onetower import stack
from core.settings import Settings
from streams.events import UserEvent
from streams.state import StateStore
from onetower.worker import broker_credentials

PASSWORD = "pa55:w/rd@x"  # characters a URL must escape
URL_PASSWORD = "pa55%3Aw%2Frd%40x"


@pytest.fixture()
def locked_redis(tmp_path, base_settings: Settings) -> Iterator[Settings]:
    """Settings pointing at a private redis-server that requires PASSWORD."""
    server = stack.Redis(base_settings.model_copy(update={"state_dir": tmp_path, "redis_url": "redis://127.0.0.1:16480/0"}))
    server.start()
    try:
        redis.Redis(port=16480).config_set("requirepass", PASSWORD)
        yield server.settings
    finally:
        server.stop()


@pytest.mark.stack
def test_a_password_in_the_url_or_apart_opens_redis_and_is_never_shown(locked_redis: Settings) -> None:
    with pytest.raises(redis.AuthenticationError):
        StateStore.from_settings(locked_redis).r.ping()
    in_url = locked_redis.model_copy(update={"redis_url": f"redis://:{URL_PASSWORD}@127.0.0.1:16480/0"})
    apart = locked_redis.model_copy(update={"redis_password": SecretStr(PASSWORD)})
    for settings in (in_url, apart):
        assert StateStore.from_settings(settings).apply(UserEvent(user_id="u", features={"age": 3}))
        assert PASSWORD not in repr(settings) and URL_PASSWORD not in repr(settings)
    assert in_url.redis_url_masked == "redis://:***@127.0.0.1:16480/0"
    assert Settings(redis_url=f"redis://app:{URL_PASSWORD}@h:1/0").redis_url_masked == "redis://app:***@h:1/0"
    assert apart.redis_url_masked == apart.redis_url


def test_kafka_security_reaches_kafka_python_and_faust() -> None:
    plain = Settings(_env_file=None)
    assert plain.kafka_client_config() == {"bootstrap_servers": plain.kafka_bootstrap, "security_protocol": "PLAINTEXT"} and broker_credentials(plain) is None
    sasl = Settings(_env_file=None, kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                    kafka_sasl_username="app", kafka_sasl_password=SecretStr("pw"))
    assert sasl.kafka_client_config() == {"bootstrap_servers": sasl.kafka_bootstrap, "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                                          "sasl_plain_username": "app", "sasl_plain_password": "pw"}
    aiokafka = credentials_to_aiokafka_auth(broker_credentials(sasl))
    assert {k: v for k, v in aiokafka.items() if k != "ssl_context"} == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "app", "sasl_plain_password": "pw"}
    assert aiokafka["ssl_context"] is not None
    assert "pw" not in repr(sasl)
    tls = credentials_to_aiokafka_auth(broker_credentials(Settings(_env_file=None, kafka_security_protocol="SSL")))
    assert tls["security_protocol"] == "SSL" and tls["ssl_context"] is not None
    with pytest.raises(ValidationError, match="kafka_sasl_username and kafka_sasl_password"):
        Settings(_env_file=None, kafka_security_protocol="SASL_PLAINTEXT")
