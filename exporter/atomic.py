"""Write a directory completely or not at all: stage it beside the target, then rename it into place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Move staging to out_dir; an existing out_dir is replaced only once the new one is complete."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)
