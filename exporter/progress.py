"""Progress messages for long export work: one logger, printed to stderr by the CLI. (The libraries' own
output is kept out of the way by runtime/library_output.py.)"""

from __future__ import annotations

import logging

logger = logging.getLogger("ortseq.export")


def log(message: str) -> None:
    logger.info(message)
