"""The errors of the models package: each one carries a message a user can act on."""

from __future__ import annotations

from core.errors import OnetowerError


class ModelError(OnetowerError):
    """A base model, artifact or input that the models package cannot use."""


class ArtifactError(ModelError):
    """A model artifact directory that is missing, corrupt, or made for other code."""


class RenderError(ModelError, ValueError):
    """Features or counters that cannot be rendered into a prompt."""
