"""Directories written whole: readers see the old directory or the complete new one, never half of one.

And never a directory the user did not ask us to replace: `--out` may name a new directory, an empty one,
or one that ortseq itself wrote (an export or a bundle), and that last one only with `--force` and only
while it holds nothing but ortseq's own files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .manifest import MANIFEST_FILE

logger = logging.getLogger("ortseq")
BUNDLE_LAUNCHER = "summarize"  # a bundle is BUNDLE/summarize + BUNDLE/model/manifest.json (runtime/bundle.py)
BUNDLE_CODE = "ortseq"  # the runtime's code in a bundle: Python files only
BUNDLE_ENTRIES = (BUNDLE_LAUNCHER, "model", BUNDLE_CODE, "requirements.txt", "README.md")


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
    check_only_ortseq_files(out_dir)


def check_only_ortseq_files(directory: Path) -> None:
    """--force replaces an export's or a bundle's own files, nothing else: a file the user put beside them
    makes it refuse, by name (replacing the directory would delete it)."""
    foreign = foreign_entries(directory)
    if foreign:
        listed = ", ".join(str(directory / name) for name in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise OutputDirError(
            f"--out {directory} holds what ortseq did not write ({listed}): --force would delete it; "
            "move it out or choose a new directory"
        )


def foreign_entries(directory: Path) -> list[str]:
    """What lies in an export or bundle directory that ortseq did not write there, relative to it."""
    directory = Path(directory)
    if (directory / MANIFEST_FILE).is_file():
        return _not_listed(directory, _export_files(directory))
    foreign = _not_listed(directory, set(BUNDLE_ENTRIES))
    foreign += [f"model/{name}" for name in _not_listed(directory / "model", _export_files(directory / "model"))]
    code = directory / BUNDLE_CODE
    foreign += [
        str(path.relative_to(directory))
        for path in sorted(code.rglob("*"))
        if not (path.is_dir() or path.suffix in (".py", ".pyc"))
    ]
    return foreign


def _export_files(export_dir: Path) -> set[str]:
    """manifest.json and the files it lists; an unreadable manifest lists nothing (everything else is foreign)."""
    try:
        listed = json.loads((export_dir / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {MANIFEST_FILE}
    return {MANIFEST_FILE, *listed} if isinstance(listed, dict) else {MANIFEST_FILE}


def _not_listed(directory: Path, own: set[str]) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir() if entry.name not in own)


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
        check_only_ortseq_files(out_dir)  # again: a file may have been put there while the new one was written
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
