"""Candidates chosen on the decoder's device by search_step.onnx (graphs/contract.py documents it).

The decoder step's logits stay where the decoder wrote them (bound to the search step without a
copy); log-softmax, the logits processors that ban ids, the running scores and the top-k run there,
and only [batch, k] scores and ids come back. The bans shared by every row are a bias uploaded once;
those of a row's own tokens (n-grams, bad words) are found on the host from the token ids alone and sent
as a few indices per row. The processors that read the scores' values (repetition penalties,
remove_invalid_values) run runtime/search.py's HostCandidates on the full logits instead, and so does a
step with a forced token (forced_bos/eos_token_id), whose scores do not depend on the logits.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import numpy as np
import onnxruntime as ort

from .search import (
    EncoderTokens,
    HostCandidates,
    SearchSettings,
    needs_scores,
    process_scores,
    row_bans,
    row_independent_state,
)


class DeviceStep(Protocol):
    """What the search step reads from a decoder step driver (runtime/sessions.py)."""

    device: str  # "cpu" or "cuda": where logits_value lives
    logits_value: ort.OrtValue  # the last step's logits [rows, vocab] float32


def processor_bias(settings: SearchSettings, cur_len: int, vocab: int) -> np.ndarray | None:
    """The processors that ban the same ids in every row at this length, as a bias [1, vocab] float32,
    0 or -inf where banned: with row_bans, process_scores(scores) == scores + bias, banned rows' ids -inf,
    whenever needs_scores is False (for finite scores and -inf; a +inf logit banned would give NaN, which
    no model's fp32 logits hold). None where a token is forced: then every score is set, none from the logits.

    Taken from process_scores itself, applied to a row of NaN (the row bans off): what it set is no
    longer NaN. So the bias follows its conditions and order (min_length, suppress, begin_suppress)."""
    shared = replace(settings, no_repeat_ngram_size=0, bad_words_ids=None)
    probe = np.full((1, vocab), np.nan, dtype=np.float32)
    process_scores(shared, np.zeros((1, cur_len), dtype=np.int64), probe)
    banned = ~np.isnan(probe)
    if np.any(probe[banned] != -np.inf):
        return None
    return np.where(banned, np.float32(-np.inf), np.float32(0.0))


def ban_matrix(rows: np.ndarray, ids: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, ids) pairs as ScatterElements' [height, width] indices and values: -inf at each row's
    banned ids; padding repeats the row's first ban (the same value again) or writes 0 to id 0 of a row
    without bans, so writes to one index always agree (ScatterElements leaves their order open)."""
    counts = np.bincount(rows, minlength=height)
    width = max(1, int(counts.max(initial=0)))
    order = np.argsort(rows, kind="stable")
    rows, ids = rows[order], ids[order]
    slots = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    indices = np.zeros((height, width), dtype=np.int64)
    indices[rows, slots] = ids
    padding = np.arange(width)[None, :] >= counts[:, None]
    indices = np.where(padding, indices[:, :1], indices)  # a row without bans: 0
    values = np.where(padding & (counts[:, None] == 0), np.float32(0.0), np.float32(-np.inf))
    return indices, values.astype(np.float32)


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
        _, ids = self._run(bias, sequences, np.zeros((sequences.shape[0], 1), np.float32), 1, log_probs=False)
        return ids[:, 0]

    def beam(
        self, logits: np.ndarray, sequences: np.ndarray, running_scores: np.ndarray, keep: int
    ) -> tuple[np.ndarray, np.ndarray]:
        bias = self._device_bias(sequences, logits.shape[-1])
        if bias is None:
            self.host_steps += 1
            return self.host.beam(logits, sequences, running_scores, keep)
        return self._run(bias, sequences, running_scores, keep, log_probs=True)

    def _device_bias(self, sequences: np.ndarray, vocab: int) -> ort.OrtValue | None:
        """The bias of this step on the device, or None when the step must choose on the host."""
        cur_len = sequences.shape[1]
        if needs_scores(self.settings, self.encoder):
            return None
        state = row_independent_state(self.settings, cur_len)
        if state not in self._biases:
            bias = processor_bias(self.settings, cur_len, vocab)
            self._biases[state] = None if bias is None else ort.OrtValue.ortvalue_from_numpy(bias, self._step.device, 0)
        return self._biases[state]

    def _run(
        self, bias: ort.OrtValue, sequences: np.ndarray, running_scores: np.ndarray, k: int, log_probs: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        vocab = self._step.logits_value.shape()[-1]
        ban_ids, ban_values = ban_matrix(*row_bans(self.settings, sequences, vocab, self.encoder), len(sequences))
        self._bind_host("ban_ids", ban_ids)
        self._bind_host("ban_values", ban_values)
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
