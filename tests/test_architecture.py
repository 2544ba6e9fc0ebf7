"""The layering written in README's layout section, enforced: import-linter's contracts in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """Layers (onetower > indexer | training > models > streams > core) and no cycle inside a package."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint) if lint.exists() else "lint-imports", "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_every_error_onetower_defines_is_an_onetower_error():
    """Callers catch ``OnetowerError`` for "a clear message": an error class outside the hierarchy would slip past them."""
    import importlib
    import inspect
    import pkgutil

    from core.errors import OnetowerError

    outside = []
    for package in ("core", "streams", "models", "indexer", "training", "onetower"):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, prefix=f"{package}."):
            if info.name == "onetower.__main__":
                continue  # running it starts the CLI
            module = importlib.import_module(info.name)
            for name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == module.__name__ and issubclass(cls, BaseException) and not issubclass(cls, OnetowerError):
                    outside.append(f"{info.name}.{name}")
    assert outside == []
