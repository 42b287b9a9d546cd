"""The family contract: every hook a model family implements, with its default.

A family is one class (one module under exporter/families/) holding everything ortseq knows about an
architecture: which checkpoints it handles, how to load them, their dims and special tokens, the two
export modules (graphs/contract.py), its short names and offline tiny models, its tokenizer quirks.
Generic code (exporter/pipeline.py, sources.py, beam_search_op.py, tokenizer_files.py) calls these
hooks and never asks which family it holds. A near relative subclasses its family and states only
what differs (PegasusFamily(BartFamily), LSGPegasusFamily(PegasusFamily)). Which families exist is
graphs/families.py's registry; docs/adding-a-family.md walks through adding one, hook by hook.

The tokenizer contract. An export ships ONE tokenizer.json (tokenizers library) that the runtime uses
both ways: to encode the source text and to decode the generated ids. It is the checkpoint tokenizer's
own tokenizers form (a fast tokenizer's tokenizer.json, copied), or, for a sentencepiece-backed ("slow")
one, what a transformers converter makes of it (transformers' registered converters, or the family's
`tokenizer_converters`). A converter must give the slow tokenizer's ids, the special tokens it appends
included (sentencepiece tokenizers of this lineage append </s>: the converter's post-processor does);
the slow tokenizer's added and special tokens are then re-added as tokenizers tokens (so that a typed
"</s>" is one token and decoding skips them) and each must keep its id. A family whose source and
target texts use two vocabularies (Marian's source.spm/target.spm) is served only if its ids are one
vocabulary (vocab.json), decoded by the same pieces. `check_tokenizer_contract` below is the one place
these rules are checked, on every export (exporter/tokenizer_files.py calls it): ids of probe texts and
their decoded text equal the checkpoint tokenizer's, or the export fails naming the first difference.

The transformers attributes the export modules read. The two export modules read the transformers
model's own submodules and weights; a family states which (dotted paths, `[]` for every element of a
list) in `model_attributes`, and they are checked right after loading (`check_model_attributes`), so a
transformers version that renamed one fails naming it, not deep inside a trace.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ...graphs import contract
from ...graphs.families import RegisteredFamily, registered
from ..errors import ModelAttributeError, TokenizerContractError

if TYPE_CHECKING:
    import onnx
    from torch import nn

    from ...graphs.manifest import ModelDims, SpecialTokens
    from ..checkpoint_check import CheckpointLayout

# The encoder is traced at a short, odd length by default; verify.py then checks it at many others.
DEFAULT_ENCODER_TRACE_LENGTH = 9

# Groups of files any one of which holds a vocabulary transformers can build a tokenizer from (tokenizers'
# own file; sentencepiece models; WordPiece; byte-level BPE, its vocab.json with merges.txt).
DEFAULT_TOKENIZER_FILES: tuple[tuple[str, ...], ...] = (
    ("tokenizer.json",),
    ("spiece.model",),
    ("sentencepiece.bpe.model",),
    ("tokenizer.model",),
    ("vocab.txt",),
    ("vocab.json", "merges.txt"),
)
# What a hub download fetches besides the tokenizer files: configs, weights, remote code (not other
# frameworks' weights).
# pytorch_model*.bin: pytorch_model.bin and the shards of a sharded one (its index is a .json); never
# other frameworks' weights (tf_model.h5, flax_model.msgpack)
CHECKPOINT_DOWNLOAD_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "pytorch_model*.bin", "*.py")


def from_pretrained(model_class, source_dir: str, **kwargs) -> nn.Module:
    """model_class.from_pretrained in float32, in eval mode: every load of a checkpoint goes through here.

    transformers 5 loads a checkpoint in the dtype its weights are stored in (dtype="auto"); 4.x, on a
    CPU, upcast fp16/bf16-stored weights to float32 and computed in float32, and so does ortseq's fp32
    export (fp16 graphs for GPUs are `ortseq quantize --to fp16`, from the fp32 export)."""
    import torch

    return model_class.from_pretrained(source_dir, dtype=torch.float32, **kwargs).eval()


class UnsupportedModelError(ValueError):
    """The checkpoint is of an architecture ortseq cannot export (yet)."""


class Family:
    """Base of every model family. Required hooks raise NotImplementedError; optional ones have defaults."""

    # The manifest's `family` string and the family's entry in graphs/families.py; the runtime reads it, so it
    # never changes for a family.
    name: ClassVar[str] = ""
    # Short names users type (`ortseq export ALIAS`) -> hub id, or "tiny:KIND" for a tiny model built offline.
    aliases: ClassVar[dict[str, str]] = {}
    # Whether `reference_model` computes the encoder output itself (exporter/verify.py,
    # verify_against_transformers); false: the export's encoder output is given to its decoder.
    reference_encoder: ClassVar[bool] = True

    # Which of `tiny_builders`' kinds are trained on a task (exporter/tiny/trained.py), so that
    # quantization quality measured on them means something; the others are random.
    trained_tiny_kinds: ClassVar[tuple[str, ...]] = ()

    @property
    def registration(self) -> RegisteredFamily:
        """This family's entry in graphs/families.py: the facts the runtime reads too."""
        return registered(self.name)

    @property
    def supports_beam_search_op(self) -> bool:
        """Whether exporter/beam_search_op.py can build ORT's BeamSearch-op graph over this family's modules."""
        return self.registration.beam_search_op

    # ------------------------------------------------------------------ required

    def handles(self, config: dict) -> bool:
        """Whether this family exports a checkpoint with this config.json. A subclass may handle a
        subset of its parent's checkpoints: the registry then picks the subclass (specific before generic)."""
        raise NotImplementedError

    def load_model(self, source_dir: str) -> nn.Module:
        """The transformers model of the checkpoint folder, in eval mode."""
        raise NotImplementedError

    def dims(self, model: nn.Module) -> ModelDims:
        raise NotImplementedError

    def special_tokens(self, model: nn.Module) -> SpecialTokens:
        """The pad, EOS and decoder-start ids transformers' generate() uses for this model."""
        raise NotImplementedError

    def encoder_export(self, model: nn.Module, fused: bool = True) -> nn.Module:
        """input_ids, attention_mask -> the encoder outputs of graphs/contract.py; fused: self-attention as
        onnxruntime's MultiHeadAttention (exporter/attention.py encoder_self_attention), else plain ONNX."""
        raise NotImplementedError

    def decoder_export(self, model: nn.Module, body: str = contract.DMMHA_BODY) -> nn.Module:
        """One decoder step of contract 0.3 (graphs/contract.py: static cache, cache indirection), its
        self-attention exported as `body` (exporter/attention.py's DMMHA or PLAIN)."""
        raise NotImplementedError

    def concat_decoder_export(self, model: nn.Module) -> nn.Module:
        """One decoder step of the concat contract (graphs/contract.py): the layout of ortseq 0.2's
        decoder.onnx, and of the decoder subgraph ORT's BeamSearch op runs (exporter/beam_search_op.py)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional, with defaults

    def tiny_builders(self) -> dict[str, Callable[[Path], Path]]:
        """Tiny models built offline: KIND (the source "tiny:KIND") -> builder(out_dir) -> checkpoint folder."""
        return {}

    def add_special_tokens(self, source: str) -> bool:
        """Whether inputs are tokenized with the tokenizer's special tokens, as the source's model card does."""
        return True

    def tokenizer_converters(self) -> dict[str, type]:
        """Extra slow-to-fast tokenizer converters (class name -> transformers converter) this family's
        sentencepiece-backed tokenizers need beyond transformers' registered ones."""
        return {}

    def tokenizer_files(self) -> tuple[tuple[str, ...], ...]:
        """Groups of file names, each a complete vocabulary: a checkpoint holding none of the groups is
        refused before any export work (exporter/tokenizer_files.py)."""
        return DEFAULT_TOKENIZER_FILES

    def download_patterns(self) -> tuple[str, ...]:
        """The files a hub download of this family's checkpoints fetches (exporter/sources.py): configs,
        weights, and every tokenizer file of `tokenizer_files`."""
        tokenizer = sorted({name for group in self.tokenizer_files() for name in group})
        return (*CHECKPOINT_DOWNLOAD_PATTERNS, *tokenizer)

    def model_attributes(self, model: nn.Module) -> tuple[str, ...]:
        """The attributes of the loaded model the export modules read (dotted paths from the model, `[]`:
        every element), checked after loading (see the module docstring). Default: none stated."""
        return ()

    def encoder_trace_length(self, model: nn.Module) -> int:
        """Source length the encoder is traced at."""
        return DEFAULT_ENCODER_TRACE_LENGTH

    def encoder_verify_lengths(self, model: nn.Module) -> list[int]:
        """Source lengths to verify the encoder graph at, beyond verify.py's own."""
        return []

    def finalize_encoder_graph(self, encoder: nn.Module, graph: onnx.ModelProto) -> None:
        """Edit the traced encoder graph before it is saved (e.g. add a custom op's ONNX function)."""

    def checkpoint_layout(self, model: nn.Module) -> CheckpointLayout:
        """What the transformers version that wrote a checkpoint meant by its tensor names: which names it
        held as one tensor (stored once) and which it computes from the config (may be absent).
        exporter/checkpoint_check.py takes every tensor of the model from the files by this layout, for
        the export (after load_model) and for the reference (after reference_model). Default: no ties
        beyond the model's own shared parameters, nothing computed."""
        from ..checkpoint_check import CheckpointLayout

        return CheckpointLayout()

    def reference_model(self, source_dir: str) -> nn.Module:
        """The checkpoint as transformers itself loads and runs it: the reference the export is compared
        with (exporter/verify.py). Default: transformers' AutoModelForSeq2SeqLM.from_pretrained, its own
        defaults but float32 (from_pretrained above), none of ortseq's loading (load_model may be wrong).
        verify.py then makes its tensors the checkpoint files' own by checkpoint_layout, as for the export:
        transformers 5.x leaves some tensors of 4.x checkpoints random, and the files, not either loader,
        are the ground truth."""
        from transformers import AutoModelForSeq2SeqLM

        return from_pretrained(AutoModelForSeq2SeqLM, source_dir)


def check_model_attributes(family: Family, model: nn.Module) -> None:
    """ModelAttributeError naming the first attribute of family.model_attributes the model lacks."""
    for path in family.model_attributes(model):
        missing = _missing_attribute(model, path.split("."))
        if missing is not None:
            raise ModelAttributeError(
                f"{family.name}: the loaded {type(model).__name__} has no {missing} (the export reads {path}): "
                f"another transformers version, or a variant of the model the {family.name} export does not handle"
            )


def _missing_attribute(obj, parts: list[str], done: str = "model") -> str | None:
    """The dotted path of the first attribute along parts that obj lacks, or None; `name[]` walks every element."""
    if not parts:
        return None
    part, rest = parts[0], parts[1:]
    name = part.removesuffix("[]")
    if not hasattr(obj, name):
        return f"{done}.{name}"
    value = getattr(obj, name)
    if part == name:
        return _missing_attribute(value, rest, f"{done}.{name}")
    for index, element in enumerate(value):
        missing = _missing_attribute(element, rest, f"{done}.{name}[{index}]")
        if missing is not None:
            return missing
    return None


def check_tokenizer_contract(reference, runtime, texts: list[str], add_special_tokens: bool) -> None:
    """The tokenizer contract (module docstring), checked: `runtime` (runtime/tokenizer.py's TextTokenizer
    over the export's tokenizer.json) encodes each text to the ids `reference` (the checkpoint's
    transformers tokenizer) gives, every added and special token keeps its id, and decoding those ids
    gives reference's text. TokenizerContractError names the first difference."""
    name = type(reference).__name__
    for token_id, token in sorted(reference.added_tokens_decoder.items()):
        got = runtime.token_id(token.content)
        if got != token_id:
            raise TokenizerContractError(
                f"{name}: token {token.content!r} has id {got} in tokenizer.json, not {token_id}"
            )
    for text in texts:
        expected = reference(text, add_special_tokens=add_special_tokens).input_ids
        got = runtime.token_ids([text])[0]
        if got != expected:
            raise TokenizerContractError(
                f"{name}: tokenizer.json encodes {text[:40]!r} as {got[:12]}..., transformers as {expected[:12]}..."
            )
        decoded = runtime.decode([expected])[0]
        if decoded != reference.decode(expected, skip_special_tokens=True):
            raise TokenizerContractError(f"{name}: tokenizer.json decodes {text[:40]!r} as {decoded[:40]!r}")


def most_specific(matching: list[Family]) -> Family:
    """The family among matching that every other one is a parent of; refuses unrelated matches."""
    for family in matching:
        if all(isinstance(family, type(other)) for other in matching):
            return family
    names = sorted(family.name for family in matching)
    raise UnsupportedModelError(f"several unrelated families claim this checkpoint: {names}")
