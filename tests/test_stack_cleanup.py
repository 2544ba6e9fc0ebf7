"""A failing test leaves no server behind: otherwise the next run finds the port taken and fails too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[1]
FAILING_TEST = '''
import os
from pathlib import Path

from onetower import stack


def test_starts_a_server_then_fails(private_stack):
    Path(os.environ["SERVER_PID_FILE"]).write_text(str(stack.Redis(private_stack).start().pid))
    assert False, "fails on purpose"
'''


def _listening(port: int) -> list[int | None]:
    return [c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_LISTEN]


def test_a_failing_test_leaves_no_server_running(tmp_path: Path) -> None:
    """Run a test that starts the private Redis and fails, in its own pytest, with this suite's fixtures."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_fails.py").write_text(FAILING_TEST)
    pid_file = tmp_path / "server.pid"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path / "test_fails.py")],
        cwd=REPO, env={**os.environ, "SERVER_PID_FILE": str(pid_file)}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1 and "1 failed" in proc.stdout and pid_file.exists(), proc.stdout + proc.stderr
    pid = int(pid_file.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _listening(16379) == []
