"""onetower: one shared LLM tower for users and items, kept fresh by a streaming pipeline.

This package is the application layer, at the top: the ``onetower`` CLI (``cli`` and the ``*_cli`` command
groups), the worker process (``worker``), the demo, and the local stack. Library code lives below it
(``indexer`` | ``training`` > ``models`` > ``streams`` > ``core``) and never imports it."""

__version__ = "0.1.0"
