"""The local stack: real Kafka (KRaft), redis-server (or a three-node Redis Cluster, ``redis_cluster``) and
Milvus standalone on 127.0.0.1.

Each server runs in its own process group with a pid file under ``<state_dir>/run``, logs under
``<state_dir>/logs`` and data under ``<state_dir>/<name>``, so ``up`` is idempotent and ``down``
can make sure nothing is left behind.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.errors import OnetowerError
from core.settings import Settings


class StackError(OnetowerError):
    """A server could not be started, found or stopped; the message says what to do."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    ready: bool
    address: str


class Service:
    """One local server: how to start it and how to tell it is ready."""

    name: str = ""
    start_timeout_s: float = 60.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.state_dir / self.name
        self.pid_file = settings.state_dir / "run" / f"{self.name}.pid"
        self.log_file = settings.state_dir / "logs" / f"{self.name}.log"

    # -- to be provided by each server
    def address(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    def prepare(self) -> None:
        """Create config and data directories before the first start."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    # -- shared lifecycle
    def pid(self) -> int | None:
        """The pid from the pid file if that process is still alive."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def status(self) -> ServiceStatus:
        pid = self.pid()
        return ServiceStatus(self.name, pid, pid is not None and self.is_ready(), self.address())

    def start(self) -> ServiceStatus:
        """Start the server unless it already runs, then wait until it answers."""
        if self.pid() is None:
            if self.is_ready():
                raise StackError(f"{self.name}: something else already listens on {self.address()}; stop it or change the port")
            self.prepare()
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "ab") as log:
                proc = subprocess.Popen(
                    self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=self.data_dir, start_new_session=True, env=self.environment(),
                )
            self.pid_file.write_text(str(proc.pid))
        self._wait(self.is_ready, f"{self.name} did not become ready in {self.start_timeout_s:.0f}s; see {self.log_file}")
        return self.status()

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM the server's process group, wait, then SIGKILL whatever is left of it."""
        pid = self.pid()
        if pid is not None:
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _group_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            _signal_group(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _group_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)

    def _wait(self, check: Callable[[], bool], message: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.pid() is None:
                raise StackError(f"{self.name} exited during start-up; see {self.log_file}")
            if check():
                return
            time.sleep(0.5)
        raise StackError(message)


class Redis(Service):
    """A redis-server on ``port`` (default: redis_url's)."""

    name = "redis"
    start_timeout_s = 20.0

    def __init__(self, settings: Settings, port: int | None = None) -> None:
        super().__init__(settings)
        self.port = settings.redis_port if port is None else port

    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            raise StackError("redis-server is not installed; run the setup command (make setup)")
        # appendfsync always: a script's reply comes after the AOF fsync, so the offsets a worker commits
        # after it cover only events on disk. (WAITAOF, Redis >= 7.2, is not in Debian's 7.0.)
        return [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"]

    def is_ready(self) -> bool:
        import redis

        try:
            # retry=None: redis-py's default retries a refused connection for seconds
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, retry=None).ping())
        except redis.RedisError:
            return False


class RedisClusterNode(Redis):
    """Node ``index`` of the local Redis Cluster, on redis_url's port + ``index`` (its cluster bus on that + 10000)."""

    def __init__(self, settings: Settings, index: int) -> None:
        self.name = f"redis-{index}"
        super().__init__(settings, settings.redis_port + index)

    def command(self) -> list[str]:
        return [*super().command(), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000"]

    def cluster_info(self) -> dict[str, str]:
        import redis

        return {k: str(v) for k, v in redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2).cluster("info").items()}


CLUSTER_NODES = 3  # the fewest primaries redis-cli --cluster create accepts
CLUSTER_SLOTS = 16384


def join_cluster(nodes: list[RedisClusterNode], timeout_s: float = 30.0) -> None:
    """Make the started ``nodes`` one cluster of primaries sharing every slot, unless they are one
    already (a restarted node rejoins from its nodes.conf); wait until every node serves."""
    if int(nodes[0].cluster_info()["cluster_slots_assigned"]) < CLUSTER_SLOTS:
        done = subprocess.run(["redis-cli", "--cluster", "create", *(n.address() for n in nodes), "--cluster-replicas", "0",
                               "--cluster-yes"], capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"redis-cli --cluster create failed: {done.stdout[-500:]}{done.stderr[-500:]}; a node that "
                             f"holds another cluster's state keeps it in {nodes[0].data_dir.parent}/redis-*: remove those to start over")
    deadline = time.monotonic() + timeout_s
    while any(n.cluster_info()["cluster_state"] != "ok" for n in nodes):
        if time.monotonic() > deadline:
            raise StackError(f"the Redis Cluster on {nodes[0].address()} did not reach state ok in {timeout_s:.0f}s")
        time.sleep(0.2)


class Kafka(Service):
    """A single-node KRaft broker+controller from the Maven Central jars fetched by setup."""

    name = "kafka"
    start_timeout_s = 90.0

    def address(self) -> str:
        return self.settings.kafka_bootstrap

    @property
    def config_file(self) -> Path:
        return self.data_dir / "server.properties"

    def _java(self, main: str, *args: str) -> list[str]:
        libs = self.settings.kafka_home / "libs"
        if not any(libs.glob("kafka_2.13-*.jar")):
            raise StackError(f"Kafka jars are missing in {libs}; run the setup command (make setup)")
        log4j = self.data_dir / "log4j.properties"
        return ["java", f"-Xmx{self.settings.kafka_heap}", f"-Xms{self.settings.kafka_heap}", "-XX:+UseG1GC",
                f"-Dlog4j.configuration=file:{log4j}", f"-Dkafka.logs.dir={self.data_dir / 'logs'}",
                "-cp", f"{libs}/*", main, *args]

    def prepare(self) -> None:
        super().prepare()
        port, cport = self.settings.kafka_port, self.settings.kafka_controller_port
        (self.data_dir / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, stdout\n"
            "log4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka=INFO\nlog4j.logger.org.apache.kafka=WARN\n"
        )
        self.config_file.write_text(
            "process.roles=broker,controller\nnode.id=1\n"
            f"controller.quorum.voters=1@127.0.0.1:{cport}\n"
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n"
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n"
            "controller.listener.names=CONTROLLER\ninter.broker.listener.name=PLAINTEXT\n"
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n"
            f"log.dirs={self.data_dir / 'data'}\n"
            f"num.partitions={self.settings.topic_partitions}\n"
            "offsets.topic.replication.factor=1\ntransaction.state.log.replication.factor=1\n"
            "transaction.state.log.min.isr=1\ngroup.initial.rebalance.delay.ms=0\n"
            "offsets.topic.num.partitions=8\nlog.retention.hours=-1\n"
        )
        if not (self.data_dir / "data" / "meta.properties").exists():
            subprocess.run(self._java("kafka.tools.StorageTool", "format", "-t", kafka_cluster_id(), "-c", str(self.config_file)),
                           check=True, capture_output=True, cwd=self.data_dir)

    def command(self) -> list[str]:
        return self._java("kafka.Kafka", str(self.config_file))

    def is_ready(self) -> bool:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(bootstrap_servers=self.address(), request_timeout_ms=3000, bootstrap_timeout_ms=2000)
        except (KafkaError, OSError, ValueError):
            return False
        try:
            admin.list_topics()
            return True
        except (KafkaError, OSError):
            return False
        finally:
            admin.close()


def kafka_cluster_id() -> str:
    """A random Kafka Uuid (22 urlsafe base64 chars), redrawn as Kafka's own generator does while it
    begins with '-': ``StorageTool format -t`` would read such an id as a flag. (A uuid4 is never one of
    Kafka's reserved ids, which are all zero but the last bit.)"""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class Milvus(Service):
    """Milvus standalone from the PyPI ``milvus`` package, run by a supervisor that stops it through its API."""

    name = "milvus"
    start_timeout_s = 180.0

    def address(self) -> str:
        return self.settings.milvus_uri

    @property
    def ready_file(self) -> Path:
        return self.data_dir / "ready"

    def prepare(self) -> None:
        super().prepare()
        self.ready_file.unlink(missing_ok=True)  # left by a supervisor that was SIGKILLed

    def command(self) -> list[str]:
        return [sys.executable, "-m", "onetower.milvus_supervisor", "--data", str(self.data_dir),
                "--port", str(self.settings.milvus_port), "--ready-file", str(self.ready_file)]

    def is_ready(self) -> bool:
        """The supervisor saw every component healthy, and a client call succeeds."""
        from pymilvus import MilvusClient

        if self.pid() is not None and not self.ready_file.exists():
            return False
        try:
            client = MilvusClient(uri=self.settings.milvus_uri, token=self.settings.milvus_token, timeout=2)
            client.list_collections()
            client.close()
            return True
        except Exception:  # pymilvus raises Milvus, grpc and OS errors of several kinds while starting
            return False


def cluster_nodes(settings: Settings) -> list[RedisClusterNode]:
    return [RedisClusterNode(settings, index) for index in range(CLUSTER_NODES)]


def services(settings: Settings) -> list[Service]:
    """The stack's servers in start order; Milvus is left out when the settings point at Milvus Lite."""
    found: list[Service] = [*(cluster_nodes(settings) if settings.redis_cluster else [Redis(settings)]), Kafka(settings)]
    if not settings.milvus_is_lite:
        found.append(Milvus(settings))
    return found


def up(settings: Settings) -> list[ServiceStatus]:
    """Start every server that is not running and wait until all answer (idempotent)."""
    return [*start_redis(settings), *(service.start() for service in services(settings) if not isinstance(service, Redis))]


def start_redis(settings: Settings) -> list[ServiceStatus]:
    """Start Redis (the server, or the cluster's nodes joined into one cluster) and wait until it serves."""
    if not settings.redis_cluster:
        return [Redis(settings).start()]
    nodes = cluster_nodes(settings)
    rows = [node.start() for node in nodes]
    join_cluster(nodes)
    return rows


def down(settings: Settings) -> None:
    """Stop every server, newest first, leaving no process behind."""
    for service in reversed(services(settings)):
        service.stop()


def status(settings: Settings) -> list[ServiceStatus]:
    return [service.status() for service in services(settings)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return False


def _group_alive(pgid: int) -> bool:
    """Whether any live process is still in the process group ``pgid``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(") ", 1)[1].split()
        except (FileNotFoundError, IndexError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
