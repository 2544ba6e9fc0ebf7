"""One error hierarchy: every error onetower raises on purpose is an ``OnetowerError``.

Callers at the top (CLI, demo, API) catch ``OnetowerError`` for "a clear message, not a traceback",
and ``Unavailable`` for "a server is down or unreachable: retrying later may help". Each module keeps
its own subclass (``InvalidEvent``, ``DatasetError``...), which also derives from the built-in error
it resembles (``ValueError``, ``LookupError``) so that generic handlers keep working.
"""

from __future__ import annotations


class OnetowerError(Exception):
    """Base of every error onetower raises on purpose; its message says what to do."""


class Unavailable(OnetowerError):
    """A server (Kafka, Redis, Milvus) is unreachable or failing: retrying later may succeed. The message
    says which server, where and why (for logs and the CLI); ``public`` says what failed without any
    server address, for HTTP clients."""

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public or message
