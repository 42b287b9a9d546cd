"""Errors about what the user gave the exporter, in a module of their own so that any exporter module
(families included, which sources.py imports) can raise them without an import cycle."""


class SourceError(ValueError):
    """The source cannot be found or downloaded; the message says what to do instead."""
