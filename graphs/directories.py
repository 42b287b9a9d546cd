"""Directories written whole: readers see the old directory or the complete new one, never half of one.

And never a directory the user did not ask us to replace: `--out` may name a new directory, an empty one,
or one that ortseq itself wrote (an export or a bundle), and that last one only with `--force`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .manifest import MANIFEST_FILE

logger = logging.getLogger("ortseq")
BUNDLE_LAUNCHER = "summarize"  # a bundle is BUNDLE/summarize + BUNDLE/model/manifest.json (runtime/bundle.py)


class OutputDirError(ValueError):
    """--out names a directory ortseq must not replace; nothing was written."""


def check_out_dir(out_dir: Path, force: bool, sources: Iterable[Path] = ()) -> None:
    """Refuse an --out that would destroy what ortseq did not write, or overlaps what it reads from."""
    out_dir = Path(out_dir)
    resolved = out_dir.resolve()
    for source in sources:
        source = Path(source).resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise OutputDirError(f"--out {out_dir} overlaps the source {source}: choose a directory outside it")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise OutputDirError(f"--out {out_dir} exists and is not a directory: choose a new directory")
    if not out_dir.exists():
        return
    if not any(out_dir.iterdir()):
        logger.info("%s exists and is empty: writing into it", out_dir)
        return
    if not written_by_ortseq(out_dir):
        raise OutputDirError(
            f"--out {out_dir} exists and is not an ortseq export or bundle: refusing to replace it; "
            "choose a new directory"
        )
    if not force:
        raise OutputDirError(f"--out {out_dir} already holds an ortseq export or bundle: pass --force to replace it")


def written_by_ortseq(directory: Path) -> bool:
    """An export (manifest.json) or a bundle (summarize + model/manifest.json) at the top of directory."""
    directory = Path(directory)
    if (directory / MANIFEST_FILE).is_file():
        return True
    return (directory / BUNDLE_LAUNCHER).is_file() and (directory / "model" / MANIFEST_FILE).is_file()


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Move staging to out_dir; an existing out_dir is replaced only once the new one is complete.
    An existing empty out_dir is filled in place (it may be someone's working directory)."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        _fill(staging, out_dir)
    elif out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)


def _fill(staging: Path, out_dir: Path) -> None:
    """Move staging's entries into out_dir, the files that mark it as ortseq's last: until they arrive,
    readers see no export."""
    markers = (MANIFEST_FILE, BUNDLE_LAUNCHER)
    for entry in sorted(staging.iterdir(), key=lambda path: path.name in markers):
        entry.rename(out_dir / entry.name)
    staging.rmdir()
