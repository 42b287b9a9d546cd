"""In-flight batching: one running set of decoder rows that requests join and leave at every step.

A row is one beam of one request. Each step, `InflightDecoder.step` runs decoder_inflight.onnx
(graphs/contract.py) once over every running row, whatever each request's settings, age or source
length, then advances each request's own search (runtime/search.py's GreedySearch / BeamSearch: the one
implementation of the search rules, the one generate() runs) on its rows' logits. A finished request
leaves at once and its rows take the next request admitted.

Where things live:
- rows: a request's beams are contiguous rows [first_row, first_row + beams), fixed for its life (no
  K/V ever moves); free rows are handed out first-fit, and a step runs over rows 0 .. the highest row in
  use (free rows in between run as harmless dummies).
- self-attention cache: [max_rows, H, max_len, dh] per layer, allocated once; a row writes its slot
  `position` (the tokens its request has cached) and reads slots 0 .. position through the indirection.
- cross K/V: one entry per request (read once for all its beams: the graph folds a request's beams into
  its query axis), padded to the running set's longest source (rounded up to MEM_BUCKET positions, the
  padding masked); the buffers are laid out again only when that grows or shrinks by a bucket.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..graphs import contract
from .errors import InvalidInputError
from .search import EncoderTokens, Search, SearchSettings, new_search
from .sessions import EncoderDecoderSessions, create_session, decoder_memory_pattern, decoder_threads

# Cross K/V are padded to a multiple of this many source positions: fewer re-layouts as requests come
# and go, at most MEM_BUCKET - 1 masked positions per row read per step.
MEM_BUCKET = 32


@dataclass(frozen=True)
class RowBudget:
    """What the running set may hold: max_rows decoder rows (a request takes num_beams of them) and, per
    row, max_len cache slots (a request's max_length - 1 decoder tokens must fit)."""

    max_rows: int = 64
    max_len: int = 256

    def check(self) -> None:
        if self.max_rows < 1 or self.max_len < 1:
            raise InvalidInputError(f"max_rows and max_len must be at least 1, got {self}")


@dataclass(eq=False)
class RowRequest:
    """One input's search in the running set."""

    input_ids: np.ndarray  # [1, src] int64
    attention_mask: np.ndarray  # [1, src] int64
    settings: SearchSettings
    search: Search | None = None  # from admission on
    first_row: int = -1
    slot: int = -1  # its cross K/V entry
    position: int = 0  # decoder tokens cached so far = the slot its rows write next
    output: np.ndarray | None = None  # the search's result once finished
    tag: object = field(default=None)  # the caller's, untouched

    @property
    def rows(self) -> int:
        return self.settings.num_beams


def open_inflight_decoder(sessions: EncoderDecoderSessions, directory: Path, provider: str, threads: int | None):
    """The session of decoder_inflight.onnx, sharing the export's embeddings file with the others."""
    if contract.INFLIGHT_DECODER_FILE not in sessions.manifest.files:
        raise InvalidInputError(
            f"{directory} has no in-flight decoder: export with `ortseq export SOURCE --out DIR --inflight` "
            "(ortseq quantize carries it into the quantized export)"
        )
    path = Path(directory) / contract.INFLIGHT_DECODER_FILE
    dims = sessions.manifest.dims
    return create_session(
        path,
        provider,
        decoder_threads(dims, threads),
        sessions.shared_weights.initializers(path),
        memory_pattern=decoder_memory_pattern(dims),
    )


class InflightDecoder:
    """The running set and its buffers (CPU), and one decoder step over all of it."""

    def __init__(self, sessions: EncoderDecoderSessions, decoder: ort.InferenceSession, budget: RowBudget):
        budget.check()
        if sessions.device != "cpu":
            raise InvalidInputError("the in-flight scheduler runs on the CPU provider only")
        dims = sessions.manifest.dims
        self.sessions, self.budget, self._session = sessions, budget, decoder
        self.layers, self._heads, self._head_dim = dims.decoder_layers, dims.decoder_heads, dims.head_dim
        self._dtype = sessions.past_dtype
        rows, max_len = budget.max_rows, budget.max_len
        cache_shape = (rows, dims.decoder_heads, max_len, dims.head_dim)
        self._cache = {name: np.zeros(cache_shape, self._dtype) for name in contract.cache_names(self.layers)}
        self._indirection = [np.zeros((rows, max_len), np.int32) for _ in range(2)]  # read one, write the other
        self._logits = np.empty((rows, dims.vocab_size), np.float32)
        self._mem = 0  # the cross buffers' source positions
        self._cross: dict[str, np.ndarray] = {}
        self._cross_mask = np.zeros((rows, 0), np.int64)
        self._mem_of: dict[int, int] = {}  # id(request) -> its encoder output length
        self._in_use = np.zeros(rows, dtype=bool)
        self._slot_in_use = np.zeros(rows, dtype=bool)  # cross K/V entries: at most one per row
        self.running: list[RowRequest] = []
        self._steps = 0
        # where the time goes, summed over the decoder's life: encoder runs (admissions), decoder steps,
        # and the searches' host work (processors, top-k, bookkeeping)
        self.seconds = {"encoder": 0.0, "decoder": 0.0, "search": 0.0}

    @property
    def rows_in_use(self) -> int:
        return int(self._in_use.sum())

    def check(self, settings: SearchSettings) -> None:
        """Refuse by name a request the budget can never hold."""
        if settings.num_beams > self.budget.max_rows:
            raise InvalidInputError(
                f"num_beams={settings.num_beams} exceeds the scheduler's {self.budget.max_rows} rows"
            )
        if settings.max_length - 1 > self.budget.max_len:
            raise InvalidInputError(
                f"max_length={settings.max_length} needs {settings.max_length - 1} cache slots per row; the "
                f"scheduler holds {self.budget.max_len} (raise the server's --max-decoder-tokens)"
            )

    def free_run(self, rows: int) -> int | None:
        """The first row of the lowest run of `rows` free rows, or None."""
        free = ~self._in_use
        if rows == 1:
            candidates = np.flatnonzero(free)
            return int(candidates[0]) if len(candidates) else None
        windows = np.lib.stride_tricks.sliding_window_view(free, rows)
        starts = np.flatnonzero(windows.all(axis=1))
        return int(starts[0]) if len(starts) else None

    def admit(self, request: RowRequest) -> bool:
        """Encode the request and give its beams rows, if the budget has room now; False when full."""
        self.check(request.settings)
        first = self.free_run(request.rows)
        if first is None:
            return False
        started = time.perf_counter()
        memory = self.sessions.encode(request.input_ids, request.attention_mask)
        mask = memory["encoder_attention_mask"]
        mem = mask.shape[1]
        slot = int(np.flatnonzero(~self._slot_in_use)[0])  # a free row means a free entry
        self._in_use[first : first + request.rows] = True
        self._slot_in_use[slot] = True
        self._mem_of[id(request)] = mem
        self._fit_mem()
        for name in contract.cross_names(self.layers):
            self._cross[name][slot, :, :mem] = memory[name][0]
        self._cross_mask[slot] = 0
        self._cross_mask[slot, :mem] = mask[0]
        request.slot = slot
        encoder = EncoderTokens(request.input_ids, request.rows, request.settings)
        request.search = new_search(1, request.settings, encoder)
        request.first_row, request.position = first, 0
        self.running.append(request)
        self.seconds["encoder"] += time.perf_counter() - started
        return True

    def retire(self, request: RowRequest) -> None:
        """Free a request's rows (finished, or its client gone)."""
        self.running.remove(request)
        self._in_use[request.first_row : request.first_row + request.rows] = False
        self._slot_in_use[request.slot] = False
        del self._mem_of[id(request)]
        self._fit_mem()

    def step(self) -> list[RowRequest]:
        """One decoder step over every running row; returns the requests that finished (retired)."""
        if not self.running:
            return []
        n = int(np.flatnonzero(self._in_use)[-1]) + 1  # rows 0 .. the highest in use
        rows = np.arange(n, dtype=np.int64)
        tokens = np.full(n, self.sessions.manifest.special_tokens.pad_token_id, dtype=np.int64)
        beam_idx, positions, row_base = rows.copy(), np.zeros(n, np.int64), rows.copy()
        requests = int(np.flatnonzero(self._slot_in_use)[-1]) + 1
        width = max(request.rows for request in self.running)
        grid, cross_slot = np.zeros((requests, width), np.int64), np.zeros(n, np.int64)
        for request in self.running:
            first, count = request.first_row, request.rows
            own = slice(first, first + count)
            request_tokens, parents = request.search.next_inputs()
            tokens[own], beam_idx[own] = request_tokens, first + parents
            positions[own], row_base[own] = request.position, first
            grid[request.slot] = first + np.minimum(np.arange(width), count - 1)
            cross_slot[own] = request.slot * width + np.arange(count)
        started = time.perf_counter()
        self._run(n, tokens, beam_idx, positions, row_base, grid, cross_slot)
        ran = time.perf_counter()
        self.seconds["decoder"] += ran - started
        finished = []
        for request in list(self.running):
            own = slice(request.first_row, request.first_row + request.rows)
            request.position += 1
            if request.search.advance(self._logits[own]):
                request.output = request.search.result()
                self.retire(request)
                finished.append(request)
        self.seconds["search"] += time.perf_counter() - ran
        return finished

    def _run(self, n, tokens, beam_idx, positions, row_base, grid, cross_slot) -> None:
        self.sessions.shared_weights.fill_rows(tokens)
        read, written = self._indirection[self._steps % 2], self._indirection[1 - self._steps % 2]
        self._steps += 1
        binding = self._session.io_binding()
        inputs = {
            "input_ids": tokens.reshape(n, 1),
            "encoder_attention_mask": self._cross_mask[: len(grid)],
            "beam_idx": beam_idx,
            "position_ids": positions,
            "row_base": row_base,
            "cache_indirection": read[:n],
            "cross_grid": grid,
            "cross_slot": cross_slot,
        }
        inputs |= {name: self._cross[name][: len(grid)] for name in contract.cross_names(self.layers)}
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        caches = {name: ort.OrtValue.ortvalue_from_numpy(cache[:n]) for name, cache in self._cache.items()}
        for (name, value), present in zip(caches.items(), contract.present_names(self.layers)):
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(present, value)  # written in place
        binding.bind_ortvalue_output(contract.PRESENT_INDIRECTION, ort.OrtValue.ortvalue_from_numpy(written[:n]))
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits[:n]))
        self._session.run_with_iobinding(binding)

    def _fit_mem(self) -> None:
        """Lay the cross buffers out for the running set's longest source, rounded up to MEM_BUCKET."""
        longest = max(self._mem_of.values(), default=0)
        mem = -(-longest // MEM_BUCKET) * MEM_BUCKET
        if mem == self._mem:
            return
        keep = min(mem, self._mem)
        used = int(np.flatnonzero(self._slot_in_use)[-1]) + 1 if self._slot_in_use.any() else 0
        # zeroed pages cost no memory until written: only the entries in use are copied
        shape = (self.budget.max_rows, self._heads, mem, self._head_dim)
        cross = {name: np.zeros(shape, self._dtype) for name in contract.cross_names(self.layers)}
        for name, old in self._cross.items():
            cross[name][:used, :, :keep] = old[:used, :, :keep]
        mask = np.zeros((self.budget.max_rows, mem), np.int64)
        mask[:used, :keep] = self._cross_mask[:used, :keep]
        self._cross, self._cross_mask, self._mem = cross, mask, mem
