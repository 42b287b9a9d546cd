"""Errors users can act on. The CLI prints their message and exits non-zero; no traceback."""

from __future__ import annotations

from ..graphs.manifest import ManifestError


class InvalidInputError(ValueError):
    """A text, token array or generation setting is not acceptable; the message says why."""


__all__ = ["InvalidInputError", "ManifestError"]
