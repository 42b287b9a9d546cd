"""The systems `make bench` compares, one small module each.

A system module defines
    load(model_dir: str, threads: int) -> generate(ids: np.ndarray, num_beams: int, new_tokens: int) -> np.ndarray
        run in a worker process of the system's own venv; `generate` returns the decoder sequences
        [batch, length] (start token included where the system returns one) as numpy,
    prepare(model: Model) -> Path
        run once in the harness process; returns the directory the worker loads (building and
        caching it under .cache/bench/<model>/ when needed).
The registry below names each system, its module, its venv's python and its `load` variant.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# ortseq as it was before issue 14's decoder work (contract 0.2: a concatenated past), for "not slower than before"
BASELINE_REF = "aa7d9f3"
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
OPTIMUM_PYTHON = ROOT / ".venv-optimum" / "bin" / "python"


@dataclass(frozen=True)
class Model:
    """One benchmark model: its transformers checkpoint and its ortseq fp32 export."""

    name: str
    checkpoint: Path
    export_dir: Path

    @property
    def cache(self) -> Path:
        return self.export_dir.parent


@dataclass(frozen=True)
class System:
    name: str
    module: str  # benchmarks.systems.<module>
    python: Path = MAIN_PYTHON
    variant: str = "fp32"  # passed to prepare/load: fp32, int8, int4
    kind: str = field(default="")  # what it is, for the README table

    @property
    def source_ref(self) -> str | None:
        """The git commit of an earlier ortseq this system runs (variant "int8@REF"), or None for this tree."""
        return self.variant.partition("@")[2] or None

    @property
    def available(self) -> str | None:
        """None when it can run here, else why not."""
        if not self.python.exists():
            return f"{self.python} is missing (make bench builds it)"
        return None


SYSTEMS = {
    s.name: s
    for s in (
        System("transformers", "hf_transformers", kind="PyTorch generate(), fp32"),
        System("optimum-fp32", "optimum_ort", OPTIMUM_PYTHON, "fp32", "optimum ORTModelForSeq2SeqLM, fp32"),
        System("optimum-int8", "optimum_ort", OPTIMUM_PYTHON, "int8", "optimum, dynamic int8 (ORTQuantizer)"),
        System("ct2-fp32", "ctranslate2_system", variant="fp32", kind="CTranslate2 Translator, fp32"),
        System("ct2-int8", "ctranslate2_system", variant="int8", kind="CTranslate2 Translator, int8"),
        System("beam-search-op", "beam_search_op", kind="ORT BeamSearch contrib op, one graph, fp32"),
        System("ortseq-fp32", "ortseq_system", variant="fp32", kind="ortseq, fp32"),
        System("ortseq-int8", "ortseq_system", variant="int8", kind="ortseq quantize --to int8"),
        System("ortseq-int4", "ortseq_system", variant="int4", kind="ortseq quantize --to int4"),
        System("ortseq-before-fp32", "ortseq_system", variant=f"fp32@{BASELINE_REF}", kind=f"ortseq at {BASELINE_REF}"),
        System(
            "ortseq-before-int8",
            "ortseq_system",
            variant=f"int8@{BASELINE_REF}",
            kind=f"ortseq at {BASELINE_REF}, int8",
        ),
    )
}


def baseline_tree(ref: str) -> Path:
    """A folder holding `ortseq/` as committed at ref (extracted once with git archive): put it on PYTHONPATH."""
    tree = ROOT / ".cache" / "bench" / f"baseline-{ref}"
    if not (tree / "ortseq" / "__init__.py").is_file():
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
        staging = tree.with_name(tree.name + ".partial")
        (staging / "ortseq").mkdir(parents=True, exist_ok=True)
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(staging / "ortseq", filter="data")
        staging.rename(tree)
    return tree
