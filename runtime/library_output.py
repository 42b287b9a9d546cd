"""The libraries' own output kept out of the way: torch's and onnxruntime's warnings, transformers'
progress bars, protobuf dumps, numpy RuntimeWarnings during export and quantize, and Ray's notices (its
C++ core's log lines, its loggers, token authentication, progress bars) during batch and serve --replicas.
`third_party_output_hidden` sends everything written to file descriptors 1 and 2 to a scratch file while
ortseq's logger keeps writing to the real stderr; `-v` shows it all.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from contextlib import contextmanager

REPLAYED_BYTES = 8000  # of hidden output, shown after an unexpected failure to help find its cause


@contextmanager
def third_party_output_hidden(enabled: bool = True):
    """Hide what other libraries print (at the file-descriptor level, so C++ logs too); `ortseq -v` shows it.

    The tail of the hidden output is replayed on stderr if the block fails with an unexpected error
    (anything but a ValueError, ortseq's errors users can act on)."""
    if not enabled or not _real_file_descriptors():
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    own_stderr = os.fdopen(os.dup(saved[2]), "w", buffering=1)
    handlers = [h for h in logging.getLogger("ortseq").handlers if isinstance(h, logging.StreamHandler)]
    streams = [handler.setStream(own_stderr) for handler in handlers]
    with tempfile.TemporaryFile() as sink:
        for fd in (1, 2):
            os.dup2(sink.fileno(), fd)
        try:
            yield
        except ValueError:
            raise
        except BaseException:
            _replay(sink, own_stderr)
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            for handler, stream in zip(handlers, streams):
                handler.setStream(stream)
            own_stderr.close()


def _real_file_descriptors() -> bool:
    """False under a capture that replaced sys.stdout/sys.stderr (pytest's capsys): nothing to redirect then."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def _replay(sink, stream) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    size = sink.seek(0, os.SEEK_END)
    sink.seek(max(0, size - REPLAYED_BYTES))
    hidden = sink.read().decode("utf-8", "replace")
    if hidden.strip():
        stream.write(
            f"ortseq: what the libraries printed before the failure (last {REPLAYED_BYTES} bytes):\n{hidden}\n"
        )
