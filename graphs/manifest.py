"""manifest.json: everything the runtime needs to know about an export directory.

Written by the exporter, read by the runtime; plain JSON so that a person can read it too.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import contract, families
from .generation import GenerationSettingError, GenerationSettings, from_json

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 3
# 1: the generation section held seven fields (max_length 20 recorded where the checkpoint left it
# unset); still read, the fields it lacks taking transformers' defaults (graphs/generation.py).
# 2: no decoder_contract: the decoder is of the concat contract (graphs/contract.py); still read and run.
# 3: decoder_contract and decoder_self_attention (an older runtime cannot run a static-cache decoder).
READABLE_SCHEMA_VERSIONS = (1, 2, 3)

# How an export can generate (runtime/engines.py): the loop always; the BeamSearch op when exported with it.
LOOP_ENGINE = "loop"
BEAM_SEARCH_OP_ENGINE = "beam-search-op"
# What the runtime knows how to run; a manifest naming anything else was not written by this ortseq.
# The families are graphs/families.py's registry; their graphs all follow graphs/contract.py.
PRECISIONS = ("fp32", "int8", "int4", "fp16")
# The graphs the runtime opens: always, and for an engine the manifest lists
GRAPH_FILES = (contract.ENCODER_FILE, contract.DECODER_FILE)
ENGINE_GRAPH_FILES = {BEAM_SEARCH_OP_ENGINE: contract.BEAM_SEARCH_FILE}
# The graphs the runtime opens when listed: exports made before them run without
OPTIONAL_GRAPH_FILES = (contract.SEARCH_STEP_FILE, contract.INFLIGHT_DECODER_FILE)
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    generation: GenerationSettings  # the model's generation config (graphs/generation.py)
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
    # graphs/contract.py's decoder contract; manifests older than the field hold a concat decoder
    decoder_contract: str = contract.STATIC_CACHE_CONTRACT
    # static-cache only: "dmmha" (onnxruntime's DecoderMaskedMultiHeadAttention) or "plain" (standard ONNX)
    decoder_self_attention: str = contract.PLAIN_BODY
    # the shared file's tables that only token lookups read, at the graphs' input_ids (graphs/contract.py,
    # LOOKUP_IDS); manifests older than the field name none
    lookup_tables: list[str] = field(default_factory=list)

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
            if not isinstance(raw, dict):
                raise ManifestError(f"{path} holds a JSON {type(raw).__name__}, not an object; export the model again")
            if raw.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
                raise ManifestError(
                    f"{path} has schema version {raw.get('schema_version')}, this ortseq reads "
                    f"{list(READABLE_SCHEMA_VERSIONS)}: export the model again with this ortseq"
                )
            manifest = cls(
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
                decoder_contract=raw.get("decoder_contract", contract.CONCAT_CONTRACT),
                decoder_self_attention=raw.get("decoder_self_attention", ""),
                lookup_tables=raw.get("lookup_tables", []),
            )
        except (
            json.JSONDecodeError,
            UnicodeDecodeError,
            RecursionError,
            KeyError,
            TypeError,
            GenerationSettingError,
        ) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
            raise ManifestError(f"{path} is corrupted or incomplete ({reason}); export the model again") from exc
        try:
            manifest.check()
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}; export the model again") from exc
        return manifest

    def check(self) -> None:
        """Types and ranges of every field, and the files it names: ManifestError saying which is wrong."""
        _check_fields(self)
        _check_files(self)

    def runtime_files(self) -> list[str]:
        """Every file the runtime opens: the graphs of its engines and the tokenizer."""
        graphs = [*GRAPH_FILES, *(ENGINE_GRAPH_FILES[e] for e in self.engines if e in ENGINE_GRAPH_FILES)]
        graphs += [name for name in OPTIONAL_GRAPH_FILES if name in self.files]
        return [*graphs, self.tokenizer.file]

    def verify_files(self, directory: Path) -> None:
        """Check that every listed file is present and has the recorded sha256."""
        for name, expected in self.files.items():
            path = Path(directory) / plain_file_name(name)
            if not path.is_file():
                raise ManifestError(f"{path} is missing from the export directory; export the model again")
            if sha256_of(path) != expected:
                raise ManifestError(f"{path} is corrupted (sha256 differs from manifest.json); export the model again")


def sha256_of(path: Path) -> str:
    import hashlib  # here: it loads OpenSSL (3 MiB resident), which a load without verification never needs

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plain_file_name(name) -> str:
    """name if it names a file directly inside the export directory; ManifestError for a path."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(c in name for c in "/\\\0:")
        or Path(name).is_absolute()
    ):
        raise ManifestError(f"file name {name!r} is not a plain file name inside the export directory")
    return name


def _check_fields(m: Manifest) -> None:
    _one_of("family", m.family, families.NAMES)
    _one_of("precision", m.precision, PRECISIONS)
    _check_int("opset", m.opset, 1)
    for name, value in vars(m.dims).items():
        _check_int(f"dims.{name}", value, 1)
    vocab = m.dims.vocab_size
    for name, value in vars(m.special_tokens).items():
        _check_int(f"special_tokens.{name}", value, 0, below=vocab)
    try:  # graphs/generation.py checks every generation setting, token ids against the vocabulary
        m.generation.checked(vocab)
    except GenerationSettingError as exc:
        raise ManifestError(f"generation: {exc}") from exc
    _check_int("tokenizer.model_max_length", m.tokenizer.model_max_length, 1)
    for name in ("add_special_tokens", "clean_up_tokenization_spaces", "strip_decoded_text"):
        if not isinstance(getattr(m.tokenizer, name), bool):
            raise ManifestError(f"tokenizer.{name} must be true or false, got {getattr(m.tokenizer, name)!r}")
    if not isinstance(m.engines, list) or not m.engines:
        raise ManifestError(f"engines must be a non-empty list, got {m.engines!r}")
    for engine in m.engines:
        _one_of("engines[]", engine, (LOOP_ENGINE, BEAM_SEARCH_OP_ENGINE))
    if BEAM_SEARCH_OP_ENGINE in m.engines and not families.registered(m.family).beam_search_op:
        raise ManifestError(f"engines lists {BEAM_SEARCH_OP_ENGINE!r}, which {m.family} exports never carry")
    _one_of("decoder_contract", m.decoder_contract, contract.DECODER_CONTRACTS)
    if m.decoder_contract == contract.STATIC_CACHE_CONTRACT:
        _one_of("decoder_self_attention", m.decoder_self_attention, contract.SELF_ATTENTION_BODIES)
    for name in ("versions", "files"):
        if not isinstance(getattr(m, name), dict):
            raise ManifestError(f"{name} must be an object, got {getattr(m, name)!r}")
    if not isinstance(m.source, str):
        raise ManifestError(f"source must be a string, got {m.source!r}")
    if not isinstance(m.lookup_tables, list) or not all(isinstance(name, str) for name in m.lookup_tables):
        raise ManifestError(f"lookup_tables must be a list of initializer names, got {m.lookup_tables!r}")


def _check_files(m: Manifest) -> None:
    """Plain names with sha256 digests, and every file the runtime opens among them (so it is hashed)."""
    for name, digest in m.files.items():
        plain_file_name(name)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ManifestError(f"files[{name!r}] must be a sha256 hex digest, got {digest!r}")
    plain_file_name(m.tokenizer.file)
    unlisted = [name for name in m.runtime_files() if name not in m.files]
    if unlisted:
        raise ManifestError(f"the runtime loads {unlisted}, which files does not list with a sha256")


def _check_int(name: str, value, minimum: int, below: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ManifestError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    if below is not None and value >= below:
        raise ManifestError(f"{name} must be below the vocabulary size {below}, got {value}")


def _one_of(name: str, value, allowed: tuple) -> None:
    if isinstance(value, (dict, list)) or value not in allowed:
        raise ManifestError(f"{name} must be one of {list(allowed)}, got {value!r}")
