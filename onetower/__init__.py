"""onetower: one shared LLM tower for users and items, kept fresh by a streaming pipeline."""

__version__ = "0.1.0"
