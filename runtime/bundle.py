"""`ortseq bundle`: a self-contained folder that summarizes on a machine with Python and pip, nothing else.

    BUNDLE/
      model/            the export's files (checked against manifest.json's sha256) and manifest.json
      ortseq/           ortseq's runtime code: runtime/ and graphs/ (no exporter, no HTTP server)
      requirements.txt  onnxruntime, numpy, tokenizers: pinned to the versions this runtime runs with
      summarize         launcher: `python3 BUNDLE/summarize "a text"`, or one text per line on stdin
      README.md

sentencepiece is not needed: the runtime runs the export's tokenizer.json with the tokenizers library.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from ..graphs.directories import BUNDLE_CODE, BUNDLE_ENTRIES, BUNDLE_LAUNCHER, check_out_dir, replace_dir
from ..graphs.manifest import MANIFEST_FILE, Manifest

logger = logging.getLogger("ortseq")

# What the runtime imports, with the lowest versions it supports (pyproject.toml); pinned when installed here.
RUNTIME_REQUIREMENTS = {"onnxruntime": ">=1.20", "numpy": ">=1.24", "tokenizers": ">=0.20"}
LEFT_OUT = shutil.ignore_patterns("__pycache__", "*.pyc", "serving")  # the HTTP server needs the [serve] extra

LAUNCHER = '''#!/usr/bin/env python3
"""Summarize with this bundle: `python3 summarize "a text" "another"`, or one text per line on stdin.
Options as `ortseq generate` (--num-beams, --max-new-tokens, ...; --help lists them)."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

try:
    from ortseq.runtime.cli import main
except ImportError as exc:
    sys.exit(f"summarize: {exc.name} is missing; install the bundle's requirements: "
             f"pip install -r {HERE / 'requirements.txt'}")

sys.exit(main(["generate", str(HERE / "model"), *sys.argv[1:]]))
'''

README = """# ortseq edge bundle: {source} ({family}, {precision})

Needs Python >= 3.10 and pip; no torch, no transformers.

    python3 -m venv venv && venv/bin/pip install -r requirements.txt
    venv/bin/python summarize "A text to summarize."          # or: ... summarize < texts.txt (one per line)
    venv/bin/python summarize --num-beams 4 --max-new-tokens 40 "A text."

From Python, with this folder on sys.path:

    from ortseq.runtime import Seq2SeqModel
    model = Seq2SeqModel.load("model")
    print(model.summarize(["A text to summarize."]))

model/manifest.json records the model, its generation defaults and the sha256 of every file (checked
on load).
"""


def make_bundle(export_dir: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write the bundle to a temporary folder beside out_dir and rename it into place when complete.
    force: replace an existing bundle at out_dir (a directory ortseq did not write is never replaced)."""
    export_dir, out_dir = Path(export_dir), Path(out_dir).absolute()
    check_out_dir(out_dir, force, [export_dir])
    manifest = Manifest.read(export_dir)
    manifest.verify_files(export_dir)  # a bundle must not carry a corrupted export elsewhere
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent) as tmp:
        staging = Path(tmp) / "bundle"
        (staging / "model").mkdir(parents=True)
        for name in [*manifest.files, MANIFEST_FILE]:
            shutil.copy2(export_dir / name, staging / "model" / name)
        _copy_runtime_code(staging / BUNDLE_CODE)
        (staging / "requirements.txt").write_text(requirements())
        (staging / BUNDLE_LAUNCHER).write_text(LAUNCHER)
        (staging / BUNDLE_LAUNCHER).chmod(0o755)
        (staging / "README.md").write_text(
            README.format(
                source=manifest.source or export_dir.name, family=manifest.family, precision=manifest.precision
            )
        )
        # --force may later replace exactly these entries (graphs/directories.py): nothing else may be written
        assert sorted(path.name for path in staging.iterdir()) == sorted(BUNDLE_ENTRIES)
        replace_dir(staging, out_dir)
    logger.info("bundle complete: %s (%.1f MB)", out_dir, directory_bytes(out_dir) / 1e6)
    return out_dir


def _copy_runtime_code(target: Path) -> None:
    """The `ortseq` package with only what summarizing needs: its __init__, runtime/ and graphs/."""
    from .. import __file__ as package_init
    from .. import graphs, runtime

    target.mkdir()
    shutil.copy2(package_init, target / "__init__.py")
    for package in (runtime, graphs):
        source = Path(package.__file__).parent
        shutil.copytree(source, target / source.name, ignore=LEFT_OUT)


def requirements() -> str:
    """requirements.txt: the runtime's dependencies only, pinned to the versions installed here."""
    lines = []
    for name, fallback in RUNTIME_REQUIREMENTS.items():
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:  # e.g. onnxruntime-gpu installed instead of onnxruntime
            lines.append(f"{name}{fallback}")
    return "\n".join(lines) + "\n"


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())
