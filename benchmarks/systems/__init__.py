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

from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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
    )
}
