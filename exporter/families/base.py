"""The family contract: every hook a model family implements, with its default.

A family is one class (one module under exporter/families/) holding everything ortseq knows about an
architecture: which checkpoints it handles, how to load them, their dims and special tokens, the two
export modules (graphs/contract.py), its short names and offline tiny models, its tokenizer quirks.
Generic code (exporter/pipeline.py, sources.py, beam_search_op.py, tokenizer_files.py) calls these
hooks and never asks which family it holds. A near relative subclasses its family and states only
what differs (PegasusFamily(BartFamily), LSGPegasusFamily(PegasusFamily)); the registry
(exporter/families/__init__.py) lists one instance of each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ...graphs import contract

if TYPE_CHECKING:
    import onnx
    from torch import nn

    from ...graphs.manifest import ModelDims, SpecialTokens
    from ..checkpoint_check import CheckpointLayout

# The encoder is traced at a short, odd length by default; verify.py then checks it at many others.
DEFAULT_ENCODER_TRACE_LENGTH = 9


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

    # The manifest's `family` string; the runtime reads it, so it never changes for a family.
    name: ClassVar[str] = ""
    # Short names users type (`ortseq export ALIAS`) -> hub id, or "tiny:KIND" for a tiny model built offline.
    aliases: ClassVar[dict[str, str]] = {}
    # Whether exporter/beam_search_op.py can build ORT's BeamSearch-op graph over this family's modules.
    supports_beam_search_op: ClassVar[bool] = False
    # Whether `reference_model` computes the encoder output itself (exporter/verify.py,
    # verify_against_transformers); false: the export's encoder output is given to its decoder.
    reference_encoder: ClassVar[bool] = True

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


def most_specific(matching: list[Family]) -> Family:
    """The family among matching that every other one is a parent of; refuses unrelated matches."""
    for family in matching:
        if all(isinstance(family, type(other)) for other in matching):
            return family
    names = sorted(family.name for family in matching)
    raise UnsupportedModelError(f"several unrelated families claim this checkpoint: {names}")
