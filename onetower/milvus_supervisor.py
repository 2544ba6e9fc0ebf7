"""Runs the ``milvus`` package's standalone server and stops it through its API on SIGTERM.

The package's own ``milvus-server`` wrapper only handles SIGINT and orphans its child on SIGTERM
(docs/DESIGN.md, Known traps), so the stack runs this small supervisor instead.
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading
import time
from pathlib import Path

from milvus import MilvusServer, MilvusServerConfig


class _ReuseAddrConfig(MilvusServerConfig):
    """The package probes each port with a plain bind, which fails while the port still has
    connections in TIME_WAIT (for a minute after a restart), and then silently moves Milvus to the
    next free port. Probing with SO_REUSEADDR, as the server itself binds, keeps it on its port."""

    def try_bind_port(self, port: int) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            return sock
        except OSError:
            sock.close()
            return None


def _wait_writable(port: int, timeout_s: float = 180.0) -> None:
    """Even after /healthz says OK, a fresh or restarted server refuses DDL for some seconds: ready
    means a collection can be created and dropped."""
    from pymilvus import MilvusClient

    deadline = time.monotonic() + timeout_s
    name = "onetower_readiness_probe"
    while True:
        try:
            client = MilvusClient(uri=f"http://127.0.0.1:{port}", timeout=10)
            if client.has_collection(name):
                client.drop_collection(name)
            client.create_collection(name, dimension=2)
            client.drop_collection(name)
            client.close()
            return
        except Exception:  # pymilvus raises grpc and Milvus errors of several kinds while starting
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="base directory for Milvus data, config and logs")
    parser.add_argument("--port", type=int, default=19530)
    parser.add_argument("--ready-file", type=Path, required=True,
                        help="written once every Milvus component reports healthy, removed on exit")
    args = parser.parse_args()
    args.ready_file.unlink(missing_ok=True)

    server = MilvusServer(config=_ReuseAddrConfig(), wait_for_started=False)
    server.set_base_dir(args.data)
    server.listen_port = args.port
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    if server.listen_port != args.port:
        server.stop()
        raise SystemExit(f"port {args.port} is taken: Milvus would have listened on {server.listen_port} instead")
    try:
        # The proxy answers list calls before the coordinators can create a collection (seen after
        # restarts); the server's /healthz only says OK when every component is up.
        server.wait_started()
        _wait_writable(args.port)
        args.ready_file.write_text(str(args.port))
        while not stop.wait(0.5):
            if server.server_proc is not None and server.server_proc.poll() is not None:
                raise SystemExit(f"milvus exited with code {server.server_proc.returncode}")
    finally:
        args.ready_file.unlink(missing_ok=True)
        server.stop()


if __name__ == "__main__":
    main()
