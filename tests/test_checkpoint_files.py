"""The checkpoint FILES users download: weight file layouts, stored dtypes, tensors generation never reads.

Each case exports a checkpoint of tests/fixtures/legacy (written by transformers 4.x, with 4.x's own
generate() goldens) in another file layout or stored dtype, and checks the export generates 4.x's tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
from helpers import ortseq
from test_legacy_checkpoints import _filled_as_5x

from ortseq.exporter.families import family_for
from ortseq.exporter.pipeline import export
from ortseq.runtime.model import Seq2SeqModel

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
TOKEN_CASES = ("greedy", "beams4")


def assert_generates_goldens(export_dir: Path, goldens: dict, cases=TOKEN_CASES) -> None:
    """The export's tokens equal the goldens' for each named case; each case discriminates (rows of
    several lengths, not all equal)."""
    model = Seq2SeqModel.load(export_dir)
    ids, mask = np.array(goldens["input_ids"]), np.array(goldens["attention_mask"])
    special = model.manifest.special_tokens
    major, minor = (int(part) for part in goldens["writer"]["transformers"].split(".")[:2])
    for case in (case for case in goldens["cases"] if case["name"] in cases):
        expected = case["sequences"]
        assert len({tuple(row) for row in expected}) > 1, case["name"]
        if (major, minor) < (4, 50) and case["kwargs"].get("num_beams", 1) > 1:  # see _filled_as_5x
            expected = _filled_as_5x(expected, special.eos_token_id, special.pad_token_id)
        expected = np.array(expected)
        got = model.generate(ids, mask, **case["kwargs"])
        assert got.shape == expected.shape and np.array_equal(got, expected), case["name"]


# How far ortseq's fp32 decoder logits may be from the writing version's fp32 ones (float32 on a CPU, stored
# fp16/bf16 weights upcast). Measured over all 71 zoo entries (logits up to 7 in size): 2.6e-6 to 1.15e-4
# (the most: LSG-Pegasus bf16 against the reference code's, and BertGeneration fp16 at 1.1e-4). Rounding the
# fp32 weights to fp16 moves 4.x's logits by 3.8e-3 to 5.9e-2 (the fp16 files' goldens against the fp32 ones');
# reading Pegasus' fp16 file through bf16 moved them by 1.9e-1, with the same tokens.
STEP_LOGITS_ATOL = 5e-4


def step_logits_error(export_dir: Path, goldens: dict) -> float:
    """The largest absolute difference between the export's logits of each decoder step, fed the writing
    version's greedy tokens, and that version's own (relay.py step_logits)."""
    model = Seq2SeqModel.load(export_dir)
    ids, mask = np.array(goldens["input_ids"]), np.array(goldens["attention_mask"])
    expected = np.array(goldens["step_logits"]["logits"], dtype=np.float32)
    got = model.sessions.teacher_forced_logits(ids, mask, np.array(goldens["step_logits"]["decoder_ids"]))
    assert got.shape == expected.shape and expected.shape[1] > 3, (got.shape, expected.shape)
    return float(np.abs(got - expected).max())


# ---------------------------------------------------------------- the checkpoint zoo
#
# Each committed fixture re-laid by a transformers 4.x (scripts/checkpoint_zoo/relay.py, in the pinned venv
# of the version that wrote the fixture) into the file layouts and stored dtypes users download, with that
# version's generate() tokens on the re-laid files, loaded as it loads them (float32 on a CPU). Built on
# first use and cached under .cache/checkpoint-zoo/ (keyed by the script and the fixture's files).

ROOT = Path(__file__).resolve().parent.parent
ZOO_CACHE = ROOT / ".cache" / "checkpoint-zoo"
RELAY = ROOT / "scripts" / "checkpoint_zoo" / "relay.py"
# fixture -> the venv of the transformers version that wrote it
WRITER_VENVS = {
    "pegasus_untied": ".venv-hf457",
    "bart_generation_in_config": ".venv-hf457",
    "bert2bert": ".venv-hf457",
    "roberta2roberta_tied": ".venv-hf457",
    "bertgeneration": ".venv-hf457",
    "lsg_pegasus_untied_norm": ".venv-lsg-ref",
}
# how each writer venv is made (`make test` makes .venv-hf457, `make test-full` both)
WRITER_VENV_BUILDS = {
    ".venv-hf457": "make .venv-hf457/.installed",
    ".venv-lsg-ref": "bash scripts/lsg_golden/setup_env.sh",
}
FAMILY_OF = {
    "pegasus_untied": "Pegasus (untied)",
    "bart_generation_in_config": "BART",
    "bert2bert": "bert2bert",
    "roberta2roberta_tied": "roberta2roberta (tie_encoder_decoder)",
    "bertgeneration": "BertGeneration",
    "lsg_pegasus_untied_norm": "LSG-Pegasus (untied)",
}
LAYOUTS = ("model.safetensors", "sharded-safetensors", "pytorch_model.bin", "pytorch_model.bin-legacy", "sharded-bin")
WITH_POOLER = ("bert2bert", "roberta2roberta_tied")  # BertGeneration's encoder has none
WITH_POSITION_IDS = ("bert2bert", "roberta2roberta_tied", "bertgeneration")


@dataclass(frozen=True)
class ZooEntry:
    fixture: str
    layout: str
    dtype: str = "float32"
    variant: str = ""  # relay.py: "", "without_pooler", "position_ids"

    @property
    def id(self) -> str:
        return "-".join([self.fixture, self.layout, self.dtype, *([self.variant] if self.variant else [])])

    def folder(self) -> Path:
        digest = hashlib.sha256(RELAY.read_bytes())
        for path in sorted((LEGACY / self.fixture).iterdir()):
            digest.update(path.name.encode() + path.read_bytes())
        return ZOO_CACHE / f"{self.id}-{digest.hexdigest()[:12]}"


def zoo_matrix() -> list[ZooEntry]:
    entries = []
    for fixture in WRITER_VENVS:
        entries += [ZooEntry(fixture, layout) for layout in LAYOUTS]
        entries += [ZooEntry(fixture, layout, dtype) for layout in LAYOUTS[::2] for dtype in ("float16", "bfloat16")]
        if fixture in WITH_POOLER:
            entries += [ZooEntry(fixture, "model.safetensors", variant="without_pooler")]
        if fixture in WITH_POSITION_IDS:
            entries += [ZooEntry(fixture, "pytorch_model.bin-legacy", variant="position_ids")]
    return entries


# the default run: one case of each defect's kind; the whole matrix is slow
REPRESENTATIVE = (
    ZooEntry("pegasus_untied", "pytorch_model.bin"),
    ZooEntry("pegasus_untied", "pytorch_model.bin-legacy"),
    ZooEntry("pegasus_untied", "model.safetensors", "float16"),
    ZooEntry("bert2bert", "sharded-bin", "bfloat16"),
    ZooEntry("bert2bert", "model.safetensors", variant="without_pooler"),
)


def build_zoo(entries) -> None:
    """Write the missing entries, one relay.py run per writer venv."""
    missing = [entry for entry in entries if not (entry.folder() / "goldens.json").is_file()]
    for venv in sorted({WRITER_VENVS[entry.fixture] for entry in missing}):
        python = ROOT / venv / "bin" / "python"
        if not python.is_file():
            pytest.fail(f"{venv} is missing: `{WRITER_VENV_BUILDS[venv]}` builds it")
        jobs = [
            {"source": str(LEGACY / e.fixture), "out": str(e.folder()), "layout": e.layout, "dtype": e.dtype,
             "variant": e.variant}
            for e in missing
            if WRITER_VENVS[e.fixture] == venv
        ]  # fmt: skip
        ZOO_CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".json", dir=ZOO_CACHE, delete=False) as jobs_file:
            json.dump(jobs, jobs_file)
        try:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(ZOO_CACHE / "hf")}
            subprocess.run([str(python), str(RELAY), jobs_file.name], check=True, env=env, timeout=1800)
        finally:
            os.unlink(jobs_file.name)


@pytest.fixture(scope="session")
def zoo(request):
    """zoo(entry) -> the entry's checkpoint folder; every zoo entry the session runs is built at the first call."""
    selected = [getattr(item, "callspec", None) for item in request.session.items]
    wanted = [spec.params["entry"] for spec in selected if spec is not None and "entry" in spec.params]

    def get(entry: ZooEntry) -> Path:
        build_zoo([*wanted, entry])  # builds only what is missing
        wanted.clear()
        return entry.folder()

    return get


def _slow_unless_representative(entries):
    assert set(REPRESENTATIVE) <= set(entries)
    return [pytest.param(e, id=e.id, marks=() if e in REPRESENTATIVE else pytest.mark.slow) for e in entries]


@pytest.mark.parametrize("entry", _slow_unless_representative(zoo_matrix()))
def test_zoo_checkpoint_exports_4x_tokens(zoo, entry, tmp_path):
    """Every layout and stored dtype exports and generates the writing version's fp32 tokens exactly, and
    its fp32 logits at fp32 tolerance (tokens alone may not tell an fp16 file read through bf16)."""
    folder = zoo(entry)
    goldens = json.loads((folder / "goldens.json").read_text())
    weights = goldens["weight_files"]
    assert any(name.endswith(".bin") for name in weights) == ("bin" in entry.layout), weights
    assert any(name.endswith(".index.json") for name in weights) == entry.layout.startswith("sharded"), weights
    export(str(folder), tmp_path / "export")
    assert_generates_goldens(tmp_path / "export", goldens)
    error = step_logits_error(tmp_path / "export", goldens)
    print(f"{entry.id}: step logits max abs error {error:.2e}")
    assert error <= STEP_LOGITS_ATOL, f"{entry.id}: the export's logits are {error:.2e} from 4.x's fp32 ones"
    record_result(entry, goldens, f"exports; 4.x tokens exactly; step logits within {error:.0e} of 4.x's")


def record_result(entry: ZooEntry, goldens: dict, result: str) -> None:
    """One line of docs/checkpoints.md's table (scripts/checkpoint_zoo/table.py renders them)."""
    results = ZOO_CACHE / "results"
    results.mkdir(parents=True, exist_ok=True)
    row = {
        "family": FAMILY_OF[entry.fixture],
        "layout": entry.layout,
        "dtype": entry.dtype,
        "variant": entry.variant,
        "writer": f"transformers {goldens['writer']['transformers']}",
        "result": result,
    }
    (results / f"{entry.id}.json").write_text(json.dumps(row) + "\n")


def lay_out_as_hub_cache(checkpoint: Path, cache: Path, repo_id: str, extra_files: dict[str, bytes]) -> Path:
    """The checkpoint's files as huggingface_hub's cache holds a download: blobs named by their hash,
    snapshots/<revision>/ of relative symlinks into blobs/, refs/main naming the revision."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    files = {path.name: path.read_bytes() for path in checkpoint.iterdir() if path.name != "goldens.json"}
    for name, content in {**files, **extra_files}.items():
        blob = hashlib.sha256(content).hexdigest()
        (repo / "blobs" / blob).write_bytes(content)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded-bin"])
def test_hub_id_exports_offline_from_the_hub_cache(zoo, tmp_path, layout):
    """`make export MODEL=pegasus-xsum` for a user whose hub cache holds google/pegasus-xsum as the hub
    serves it: pytorch_model.bin only (or its shards, pytorch_model-0000N-of-0000M.bin with
    pytorch_model.bin.index.json, as larger checkpoints are), beside other frameworks' weights, which are
    not read."""
    from ortseq.exporter.sources import ALIASES

    checkpoint = zoo(ZooEntry("pegasus_untied", layout))
    weights = json.loads((checkpoint / "goldens.json").read_text())["weight_files"]
    assert ("pytorch_model.bin.index.json" in weights) == (layout == "sharded-bin"), weights
    # a download fetches what the family's patterns match (huggingface_hub's allow_patterns: fnmatch); the
    # offline cache below holds every file whatever they match, so check them here
    patterns = family_for(checkpoint).download_patterns()
    needed = [path.name for path in checkpoint.iterdir() if path.name != "goldens.json"]
    assert not [name for name in needed if not any(fnmatch(name, pattern) for pattern in patterns)], patterns
    other_frameworks = {"tf_model.h5": b"not a torch file", "flax_model.msgpack": b"not a torch file"}
    lay_out_as_hub_cache(checkpoint, tmp_path / "hub", ALIASES["pegasus-xsum"], other_frameworks)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    done = ortseq("export", "google/pegasus-xsum", "--out", str(tmp_path / "export"), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "downloading" not in done.stderr
    assert_generates_goldens(tmp_path / "export", json.loads((checkpoint / "goldens.json").read_text()))
