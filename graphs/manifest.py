"""manifest.json: everything the runtime needs to know about an export directory.

Written by the exporter, read by the runtime; plain JSON so that a person can read it too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ortseq.graphs.generation import GenerationSettingError, GenerationSettings, from_json

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 2
# 1: the generation section held seven fields (max_length 20 recorded where the checkpoint left it
# unset); still read, the fields it lacks taking transformers' defaults (graphs/generation.py).
READABLE_SCHEMA_VERSIONS = (1, 2)
# How an export can generate (runtime/engines.py): the loop always; the BeamSearch op when exported with it.
LOOP_ENGINE = "loop"
BEAM_SEARCH_OP_ENGINE = "beam-search-op"


class ManifestError(ValueError):
    """The export directory is missing, incomplete or corrupted."""


@dataclass
class ModelDims:
    d_model: int
    encoder_layers: int
    decoder_layers: int
    decoder_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int


@dataclass
class SpecialTokens:
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int


GenerationDefaults = GenerationSettings  # the model's generation config, as declared in graphs/generation.py


@dataclass
class TokenizerInfo:
    """How the runtime tokenizes: which file, and what transformers' tokenizer does around it."""

    file: str = "tokenizer.json"
    model_max_length: int = 512
    add_special_tokens: bool = True
    clean_up_tokenization_spaces: bool = False
    strip_decoded_text: bool = False  # sentencepiece-backed ("slow") transformers tokenizers strip decoded text


@dataclass
class Quantization:
    """How a quantized export was made from its fp32 export, and how close it stays to it.

    quality holds the report of exporter/quantization/quality.py (token agreement with the fp32
    export on a fixed set of inputs, logit error of the first decode steps); plain JSON values.
    """

    format: str  # "int8", "int4" or "fp16"
    settings: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    source: str = ""  # the fp32 export directory it was made from


@dataclass
class Manifest:
    family: str
    dims: ModelDims
    special_tokens: SpecialTokens
    generation: GenerationDefaults
    tokenizer: TokenizerInfo
    opset: int
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    versions: dict[str, str] = field(default_factory=dict)
    source: str = ""
    precision: str = "fp32"
    engines: list[str] = field(default_factory=lambda: [LOOP_ENGINE])
    schema_version: int = SCHEMA_VERSION
    quantization: Quantization | None = None  # absent in fp32 exports (and in manifests older than it)
    # generation config fields that change the tokens and that ortseq does not honour, kept only when
    # exported with --ignore-generation-fields: {field: value} (transformers would apply them)
    ignored_generation_fields: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST_FILE).write_text(self.to_json() + "\n")

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST_FILE
        if not Path(directory).is_dir():
            raise ManifestError(f"export directory {directory} does not exist; run `ortseq export` first")
        if not path.is_file():
            raise ManifestError(f"{path} is missing: {directory} is not an ortseq export directory")
        try:
            raw = json.loads(path.read_text())
            if raw.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
                raise ManifestError(
                    f"{path} has schema version {raw.get('schema_version')}, this ortseq reads "
                    f"{list(READABLE_SCHEMA_VERSIONS)}: export the model again with this ortseq"
                )
            return cls(
                family=raw["family"],
                dims=ModelDims(**raw["dims"]),
                special_tokens=SpecialTokens(**raw["special_tokens"]),
                generation=from_json(raw["generation"]),
                tokenizer=TokenizerInfo(**raw["tokenizer"]),
                opset=raw["opset"],
                files=raw["files"],
                versions=raw.get("versions", {}),
                source=raw.get("source", ""),
                precision=raw.get("precision", "fp32"),
                engines=raw.get("engines", [LOOP_ENGINE]),
                schema_version=SCHEMA_VERSION,  # read as the current schema (older ones converted above)
                quantization=Quantization(**raw["quantization"]) if raw.get("quantization") else None,
                ignored_generation_fields=raw.get("ignored_generation_fields", {}),
            )
        except (json.JSONDecodeError, KeyError, TypeError, GenerationSettingError) as exc:
            raise ManifestError(f"{path} is corrupted or incomplete ({exc}); export the model again") from exc

    def verify_files(self, directory: Path) -> None:
        """Check that every listed file is present and has the recorded sha256."""
        for name, expected in self.files.items():
            path = Path(directory) / name
            if not path.is_file():
                raise ManifestError(f"{path} is missing from the export directory; export the model again")
            if sha256_of(path) != expected:
                raise ManifestError(f"{path} is corrupted (sha256 differs from manifest.json); export the model again")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
