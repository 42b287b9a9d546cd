"""What a client may send and gets back, and the per-request limits the server enforces.

Types and unknown fields are checked by pydantic (strict: "3" is not an integer, unknown parameters are
refused); the ranges of generation settings are checked in one place, `Seq2SeqModel.settings()`, which
the CLI and the Python API use too. Only limits that exist because many clients share one server
(inputs per request, input tokens, beams) live here.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, create_model

from ...graphs.generation import json_types
from ..errors import InvalidInputError
from ..model import Seq2SeqModel, check_texts
from ..search import SearchSettings

# Generation settings, one per field of graphs/generation.py's table; any left out take the model's
# generation defaults (as `ortseq generate`). Ranges and token ids are checked by Seq2SeqModel.settings().
GenerationParameters = create_model(
    "GenerationParameters",
    __config__=ConfigDict(extra="forbid", strict=True),
    __doc__="Generation settings; any left out take the model's generation defaults (as `ortseq generate`).",
    **{name: (json_type | None, Field(None, description=help)) for name, (json_type, help) in json_types().items()},
)


class SummarizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: list[str] = Field(min_length=1, description="texts to summarize, one summary each")
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)


class SummarizeResponse(BaseModel):
    summaries: list[str] = Field(description="one summary per input, in order")
    input_tokens: list[int] = Field(description="tokens of each input, special tokens included")
    output_tokens: list[int] = Field(description="tokens generated for each input, the end token included")


class ErrorDetail(BaseModel):
    type: str = Field(description="what kind of error: invalid_json, invalid_request, queue_full, ...")
    message: str = Field(description="what went wrong and what to change")
    fields: list[str] = Field(default_factory=list, description="one line per offending field, if any")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# on SIGTERM, requests in flight or queued get this long to finish (`ortseq serve`, with or without --replicas)
GRACEFUL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits. max_input_tokens None means the model's maximum input length."""

    max_inputs: int = 16
    max_input_tokens: int | None = None
    max_num_beams: int = 8

    def resolved(self, model: Seq2SeqModel) -> RequestLimits:
        """These limits with max_input_tokens filled in and checked against what the model accepts."""
        model_max = min(model.tokenizer.info.model_max_length, model.manifest.dims.max_position_embeddings)
        tokens = model_max if self.max_input_tokens is None else self.max_input_tokens
        if not 1 <= tokens <= model_max:
            raise InvalidInputError(f"max_input_tokens must lie in [1, {model_max}] for this model, got {tokens}")
        if self.max_inputs < 1 or self.max_num_beams < 1:
            raise InvalidInputError("max_inputs and max_num_beams must be at least 1")
        return RequestLimits(self.max_inputs, tokens, self.max_num_beams)


def checked_settings(request: SummarizeRequest, model: Seq2SeqModel, limits: RequestLimits) -> SearchSettings:
    """The request's resolved generation settings, or InvalidInputError saying what to change."""
    if len(request.inputs) > limits.max_inputs:
        raise InvalidInputError(
            f"{len(request.inputs)} inputs in one request; this server takes at most {limits.max_inputs}: "
            "split them over several requests"
        )
    check_texts(request.inputs, noun="input")
    settings = model.settings(**generation_kwargs(request))
    if settings.num_return_sequences != 1:
        raise InvalidInputError("num_return_sequences must be 1: the server returns one summary per input")
    if settings.num_beams > limits.max_num_beams:
        raise InvalidInputError(f"num_beams is {settings.num_beams}; this server allows at most {limits.max_num_beams}")
    return settings


def check_input_lengths(lengths: list[int], limits: RequestLimits) -> None:
    too_long = [(number, length) for number, length in enumerate(lengths, 1) if length > limits.max_input_tokens]
    if too_long:
        listed = ", ".join(f"input {number} has {length}" for number, length in too_long)
        raise InvalidInputError(
            f"inputs longer than this server's limit of {limits.max_input_tokens} tokens ({listed}): shorten them"
        )


def generation_kwargs(request: SummarizeRequest) -> dict:
    """The parameters the client set, as keyword arguments of Seq2SeqModel.generate."""
    return request.parameters.model_dump(exclude_none=True)
