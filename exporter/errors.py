"""Errors about what the user gave the exporter, in a module of their own so that any exporter module
(families included, which sources.py imports) can raise them without an import cycle."""


class SourceError(ValueError):
    """The source cannot be found or downloaded; the message says what to do instead."""


class ModelAttributeError(ValueError):
    """The loaded transformers model lacks an attribute the family's export modules read."""


class TokenizerContractError(ValueError):
    """The export's tokenizer.json would not tokenize as the checkpoint's tokenizer does."""
