"""Runs the ``milvus`` package's standalone server and stops it through its API on SIGTERM.

The package's own ``milvus-server`` wrapper only handles SIGINT and orphans its child on SIGTERM
(DESIGN.md, Known traps), so the stack runs this small supervisor instead.
"""

from __future__ import annotations

import argparse
import signal
import threading

from milvus import MilvusServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="base directory for Milvus data, config and logs")
    parser.add_argument("--port", type=int, default=19530)
    args = parser.parse_args()

    server = MilvusServer(wait_for_started=False)
    server.set_base_dir(args.data)
    server.listen_port = args.port
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    while not stop.wait(0.5):
        if server.server_proc is not None and server.server_proc.poll() is not None:
            raise SystemExit(f"milvus exited with code {server.server_proc.returncode}")
    server.stop()


if __name__ == "__main__":
    main()
