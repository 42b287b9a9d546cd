"""Candidates chosen on the decoder's device by search_step.onnx (graphs/contract.py documents it).

The decoder step's logits stay where the decoder wrote them (bound to the search step without a
copy); log-softmax, the row-independent logits processors, the running scores and the top-k run there,
and only [batch, k] scores and ids come back. The processors that depend on a row's tokens (repetition
penalties, n-gram bans once an n-gram can match, bad words of several tokens, remove_invalid_values)
are not masks: a step that needs one runs runtime/search.py's HostCandidates on the full logits. So
does a step with a forced token (forced_bos/eos_token_id), whose scores do not depend on the logits.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnxruntime as ort

from ortseq.runtime.search import (
    EncoderTokens,
    HostCandidates,
    SearchSettings,
    needs_rows,
    process_scores,
    row_independent_state,
)


class DeviceStep(Protocol):
    """What the search step reads from a decoder step driver (runtime/sessions.py)."""

    device: str  # "cpu" or "cuda": where logits_value lives
    logits_value: ort.OrtValue  # the last step's logits [rows, vocab] float32


def processor_bias(settings: SearchSettings, cur_len: int, vocab: int) -> np.ndarray | None:
    """The row-independent processors at this length as a bias [1, vocab] float32, 0 or -inf where
    banned: process_scores(scores) == scores + bias for every row whenever needs_rows is False (for
    finite scores and -inf; a +inf logit banned would give NaN, which no model's fp32 logits hold).
    None where a token is forced: then every score is set and none depends on the logits.

    Taken from process_scores itself, applied to a row of NaN: what it set is no longer NaN. So the
    bias follows its conditions and order (min_length, suppress and begin_suppress tokens, bad words)."""
    probe = np.full((1, vocab), np.nan, dtype=np.float32)
    process_scores(settings, np.zeros((1, cur_len), dtype=np.int64), probe)
    banned = ~np.isnan(probe)
    if np.any(probe[banned] != -np.inf):
        return None
    return np.where(banned, np.float32(-np.inf), np.float32(0.0))


class DeviceCandidates:
    """search.Candidates over search_step.onnx, for one generate() call's settings and decoder step.

    A bias is uploaded once per call for each state of the length-dependent processors (a handful),
    so a step copies only the running scores to the device and [batch, k] scores and ids back."""

    def __init__(
        self,
        session: ort.InferenceSession,
        step: DeviceStep,
        settings: SearchSettings,
        encoder: EncoderTokens | None = None,
    ):
        self.settings = settings
        self.encoder = encoder
        self.host = HostCandidates(settings, encoder)
        self._session = session
        self._step = step
        self._binding = session.io_binding()
        self._biases: dict[tuple[bool, ...], ort.OrtValue | None] = {}
        self._outputs: tuple[ort.OrtValue, ort.OrtValue] | None = None
        self._bound: dict[str, np.ndarray] = {}  # host inputs must outlive the binding's use of them
        self.device_steps = 0  # steps whose candidates the search step graph chose
        self.host_steps = 0

    def greedy(self, logits: np.ndarray, sequences: np.ndarray) -> np.ndarray:
        bias = self._device_bias(sequences, logits.shape[-1])
        if bias is None:
            self.host_steps += 1
            return self.host.greedy(logits, sequences)
        _, ids = self._run(bias, np.zeros((sequences.shape[0], 1), np.float32), 1, log_probs=False)
        return ids[:, 0]

    def beam(
        self, logits: np.ndarray, sequences: np.ndarray, running_scores: np.ndarray, keep: int
    ) -> tuple[np.ndarray, np.ndarray]:
        bias = self._device_bias(sequences, logits.shape[-1])
        if bias is None:
            self.host_steps += 1
            return self.host.beam(logits, sequences, running_scores, keep)
        return self._run(bias, running_scores, keep, log_probs=True)

    def _device_bias(self, sequences: np.ndarray, vocab: int) -> ort.OrtValue | None:
        """The bias of this step on the device, or None when the step must choose on the host."""
        cur_len = sequences.shape[1]
        if needs_rows(self.settings, cur_len, self.encoder):
            return None
        state = row_independent_state(self.settings, cur_len)
        if state not in self._biases:
            bias = processor_bias(self.settings, cur_len, vocab)
            self._biases[state] = None if bias is None else ort.OrtValue.ortvalue_from_numpy(bias, self._step.device, 0)
        return self._biases[state]

    def _run(
        self, bias: ort.OrtValue, running_scores: np.ndarray, k: int, log_probs: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        self._bind_host("running_scores", np.ascontiguousarray(running_scores, dtype=np.float32))
        self._bind_host("log_probs", np.array(log_probs))
        self._bind_host("k", np.array([k], dtype=np.int64))
        self._binding.bind_ortvalue_input("logits", self._step.logits_value)
        self._binding.bind_ortvalue_input("bias", bias)
        scores, ids = self._output_values(running_scores.shape[0], k)
        self._binding.bind_ortvalue_output("topk_scores", scores)
        self._binding.bind_ortvalue_output("topk_ids", ids)
        self._session.run_with_iobinding(self._binding)
        self.device_steps += 1
        # copies: on the CPU numpy() is a view of the output buffers, which the next step overwrites
        return scores.numpy().copy(), ids.numpy().copy()

    def _bind_host(self, name: str, array: np.ndarray) -> None:
        self._bound[name] = array
        self._binding.bind_cpu_input(name, array)

    def _output_values(self, batch: int, k: int) -> tuple[ort.OrtValue, ort.OrtValue]:
        """[batch, k] outputs on the device, allocated once per shape (a search asks one shape per mode)."""
        if self._outputs is None or self._outputs[0].shape() != [batch, k]:
            device = self._step.device
            self._outputs = (
                ort.OrtValue.ortvalue_from_shape_and_type([batch, k], np.float32, device, 0),
                ort.OrtValue.ortvalue_from_shape_and_type([batch, k], np.int64, device, 0),
            )
        return self._outputs
