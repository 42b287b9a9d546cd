"""ONNX Runtime sessions for an export directory, and the CPU decoder-step driver.

The driver keeps the decoder's past K/V between steps and hands the search core a `StepFn`. The
encoder's cross K/V are computed once per input and fed unchanged to every step: the decoder
graph shares them across beams (graphs/contract.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphs import contract
from graphs.manifest import Manifest, ManifestError
from runtime.errors import InvalidInputError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def create_session(path: Path, provider: str, threads: int | None = None) -> ort.InferenceSession:
    if provider not in PROVIDERS:
        raise InvalidInputError(f"unknown provider {provider!r}; choose one of {sorted(PROVIDERS)}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise InvalidInputError(
            f"provider {provider!r} is not available in this onnxruntime "
            f"(available: {ort.get_available_providers()}); for cuda install the [gpu] extra"
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=[PROVIDERS[provider]])
    except Exception as exc:  # onnxruntime raises its own types: say which file is bad
        raise ManifestError(f"{path} cannot be loaded by onnxruntime ({exc}); export the model again") from exc


class EncoderDecoderSessions:
    """The encoder and decoder sessions of one export, and how to run them."""

    def __init__(self, directory: Path, manifest: Manifest, provider: str, threads: int | None = None):
        self.manifest = manifest
        self.layers = manifest.dims.decoder_layers
        self.encoder = create_session(Path(directory) / contract.ENCODER_FILE, provider, threads)
        self.decoder = create_session(Path(directory) / contract.DECODER_FILE, provider, threads)
        self._memory_names = ["encoder_attention_mask", *contract.cross_names(self.layers)]
        self.past_names = contract.past_names(self.layers)
        # float32, or float16 in fp16 exports (their K/V inputs and outputs are half precision)
        past_type = next(i.type for i in self.decoder.get_inputs() if i.name == self.past_names[0])
        self.past_dtype = np.float16 if past_type == "tensor(float16)" else np.float32
        _check_outputs(self.encoder, contract.encoder_outputs(self.layers), directory)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """What every decoder step reads: the cross-attention mask and every layer's cross K/V, by name."""
        outputs = self.encoder.run(self._memory_names, {"input_ids": input_ids, "attention_mask": attention_mask})
        return dict(zip(self._memory_names, outputs))

    def decoder_step(self, memory: dict[str, np.ndarray], rows: int) -> CpuDecoderStep:
        return CpuDecoderStep(self, memory, rows)


def _check_outputs(session: ort.InferenceSession, expected: list[str], directory: Path) -> None:
    missing = sorted(set(expected) - {output.name for output in session.get_outputs()})
    if missing:
        raise ManifestError(
            f"{directory}: the graphs lack outputs {missing}; the export was made by an older ortseq, export it again"
        )


class CpuDecoderStep:
    """A StepFn over the decoder session; the past starts empty and grows by one token per call."""

    def __init__(self, sessions: EncoderDecoderSessions, memory: dict[str, np.ndarray], rows: int):
        dims = sessions.manifest.dims
        self._session = sessions.decoder
        self._feeds = dict(memory)
        self._past_names = sessions.past_names
        empty = np.zeros((rows, dims.decoder_heads, 0, dims.head_dim), dtype=sessions.past_dtype)
        self._past = dict.fromkeys(self._past_names, empty)

    def __call__(self, tokens: np.ndarray, beam_idx: np.ndarray) -> np.ndarray:
        feeds = {**self._feeds, **self._past, "input_ids": tokens.reshape(-1, 1), "beam_idx": beam_idx}
        logits, *presents = self._session.run(None, feeds)
        self._past = dict(zip(self._past_names, presents))
        return logits
