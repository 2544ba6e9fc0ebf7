"""The demo's robustness: a broker still electing coordinators, and failures as one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from onetower import stack
from onetower.demo import ready_group_lag
from core.settings import Settings

pytestmark = pytest.mark.stack


def test_lag_waits_for_the_coordinator_of_a_fresh_broker(private_stack: Settings) -> None:
    """The private Kafka is freshly formatted: its first group requests get CoordinatorNotAvailable
    and then NotCoordinator while it creates the offsets topic."""
    stack.up(private_stack)
    assert ready_group_lag(private_stack, "onetower-demo-test") == 0


def test_a_failing_demo_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("")
    proc = subprocess.run([sys.executable, "-m", "onetower", "demo", "--short"], capture_output=True, text=True,
                          env={**os.environ, "ONETOWER_STATE_DIR": str(not_a_dir), "COLUMNS": "500"}, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: NotADirectoryError: "), output
