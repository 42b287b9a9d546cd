"""ONNX Runtime sessions for an export directory, and the decoder-step drivers.

A driver keeps the decoder's self-attention K/V between steps and hands the search core a `StepFn`.
The encoder's cross K/V are computed once per input and fed unchanged to every step: the decoder
graph shares them across beams (graphs/contract.py). Two drivers, chosen by the manifest's
decoder_contract: `DecoderStep` for static-cache decoders (contract 0.3: every buffer that lives
across steps is an OrtValue on the session's device, written in place; one code path for CPU and
CUDA), `CpuDecoderStep` for concat decoders (exports made before it).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..graphs import contract
from ..graphs.manifest import Manifest, ManifestError, ModelDims
from .errors import InvalidInputError
from .shared_weights import SharedWeights

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# onnxruntime's device name of each provider's memory (OrtValue.ortvalue_from_shape_and_type, bind_output)
DEVICES = {"cpu": "cpu", "cuda": "cuda"}
KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_NUMPY_DTYPES = KV_DTYPES | {"tensor(int64)": np.int64}  # what the encoder outputs


def create_session(
    path: Path,
    provider: str,
    threads: int | None = None,
    initializers: list[tuple[str, ort.OrtValue]] = (),
    memory_pattern: bool = True,
) -> ort.InferenceSession:
    """initializers: (name, value) that replace the graph's own (runtime/shared_weights.py); they must outlive it.
    memory_pattern: onnxruntime's one block per run for all of a shape's intermediate tensors."""
    if provider not in PROVIDERS:
        raise InvalidInputError(f"unknown provider {provider!r}; choose one of {sorted(PROVIDERS)}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise InvalidInputError(
            f"provider {provider!r} is not available in this onnxruntime "
            f"(available: {ort.get_available_providers()}); for cuda install the [gpu] extra"
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_mem_pattern = memory_pattern
    if threads:
        options.intra_op_num_threads = threads
    _register_shared_cpu_arena()
    options.add_session_config_entry("session.use_env_allocators", "1")
    for name, value in initializers:
        options.add_initializer(name, value)
    try:
        return ort.InferenceSession(str(path), options, providers=[PROVIDERS[provider]])
    except Exception as exc:  # onnxruntime raises its own types: say which file is bad
        raise ManifestError(f"{path} cannot be loaded by onnxruntime ({exc}); export the model again") from exc


# Below this many multiply-adds per row, a decoder step runs on one intra-op thread whatever `threads`
# says: its ops are too small to split, yet a second thread still costs a hand-off at every session
# run and, spinning between runs, slows the Python search beside it. Measured on tiny-pegasus
# (0.15 M per row) on the 2-core machine: one thread was faster at every batch and beam count (8 beams,
# batch 1: 0.43 vs 0.66-0.77 ms per step; docs/benchmarks.md). pegasus-xsum has 333 M per row.
SINGLE_THREAD_DECODER_MACS = 1_000_000


def _small_decoder(dims: ModelDims) -> bool:
    # per layer: self-attention q, k, v, out and cross-attention q, out (4 + 2 d^2), an FFN of ~8 d^2
    macs_per_row = dims.decoder_layers * 14 * dims.d_model**2 + dims.d_model * dims.vocab_size
    return macs_per_row < SINGLE_THREAD_DECODER_MACS


def decoder_threads(dims: ModelDims, threads: int | None) -> int | None:
    """Intra-op threads for the decoder step session: `threads`, or 1 for a decoder too small to split."""
    return 1 if _small_decoder(dims) else threads


def decoder_memory_pattern(dims: ModelDims) -> bool:
    """Whether the decoder session plans one block per step for its intermediate tensors: only for a
    decoder too small to split. It saves a step's allocations, which is felt where a step is tiny
    (tiny-pegasus, 8 beams, 64 steps: 60-61 ms with it, 64-66 without); on a real model they are noise
    next to the step's work, and the block came on top of the free chunks it did not fit (docs/architecture.md,
    *What a call's peak is made of*)."""
    return _small_decoder(dims)


@functools.cache  # once per process: one arena for all, not a new one per session created
def _register_shared_cpu_arena() -> None:
    """Give every session of this process one CPU memory arena (onnxruntime's default is one each).

    An arena keeps the memory it once held. With one per session, the decoder's arena still holds the
    last step's past and present K/V after a generate() call (1.1 GB for the xsum-shaped model at
    batch 8 x 8 beams), and the next call's encoder cannot reuse any of it: its activations and
    cross K/V come on top. Shared, they reuse each other's freed memory. onnxruntime also hands out a
    free chunk whole when it is at most 128 MB too big, and the step tensors grow by one position per
    step, so chunks went out far too big: splitting anything more than 1 MB too big stops that. The
    measured peak of two calls: 3.35 GB with an arena per session, 2.86 GB shared, 2.68 GB shared and
    split (benchmarks/profile_memory.py, docs/benchmarks.md).
    """
    cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    # no cap, onnxruntime's default growth and first chunk; split free chunks more than 1 MB too big
    arena = ort.OrtArenaCfg(0, -1, -1, 1 << 20)
    ort.create_and_register_allocator(cpu, arena)


class EncoderDecoderSessions:
    """The encoder and decoder sessions of one export, and how to run them."""

    def __init__(self, directory: Path, manifest: Manifest, provider: str, threads: int | None = None):
        self.manifest = manifest
        self.layers = manifest.dims.decoder_layers
        self.device = DEVICES.get(provider, "cpu")
        # kept: the sessions read its buffers; a GPU session copies every row of its tables at once
        lookup_tables = manifest.lookup_tables if self.device == "cpu" else ()
        self.shared_weights = SharedWeights(directory, lookup_tables)
        encoder, decoder = Path(directory) / contract.ENCODER_FILE, Path(directory) / contract.DECODER_FILE
        # The decoder first: packing its LM head holds the table three times for a moment (the mapped
        # file, a transposed copy, the packed one) and is the peak of loading; the transposed copy then
        # returns to the memory arena, where the encoder's session and activations reuse it.
        with self.shared_weights.pages_released_while():  # the decoder keeps the packed copy of the LM head
            self.decoder = create_session(
                decoder,
                provider,
                decoder_threads(manifest.dims, threads),
                self.shared_weights.initializers(decoder),
                memory_pattern=decoder_memory_pattern(manifest.dims),
            )
        # No memory pattern for the encoder: its block for a shape comes on the second run of that shape, on
        # top of the first run's freed chunks, which it does not fit (mid-size int8, 512 tokens, measured with
        # the bench worker while making it: the peak of two calls, 8 beams at batch 1, 226 -> 214 MiB, greedy
        # 210 -> 194; the encode took 55-77 ms either way). Source lengths vary, and so would the blocks.
        with self.shared_weights.pages_released_while():
            self.encoder = create_session(
                encoder, provider, threads, self.shared_weights.initializers(encoder), memory_pattern=False
            )
        self._memory_names = ["encoder_attention_mask", *contract.cross_names(self.layers)]
        self.static_cache = manifest.decoder_contract == contract.STATIC_CACHE_CONTRACT
        self.past_names = (contract.cache_names if self.static_cache else contract.past_names)(self.layers)
        _check_inputs(self.decoder, self.past_names, directory, manifest.decoder_contract)
        # float32, or float16 in fp16 exports (their K/V inputs and outputs are half precision)
        past_type = next(i.type for i in self.decoder.get_inputs() if i.name == self.past_names[0])
        self.past_dtype = KV_DTYPES.get(past_type, np.float32)
        _check_outputs(self.encoder, contract.encoder_outputs(self.layers), directory)
        # the candidates' tensor work on the decoder's device (runtime/search_step.py); exports made
        # before search_step.onnx have none and choose candidates on the host
        search_step = Path(directory) / contract.SEARCH_STEP_FILE
        self.search_step = (
            create_session(search_step, provider, threads) if contract.SEARCH_STEP_FILE in manifest.files else None
        )

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """What every decoder step reads: the cross-attention mask and every layer's cross K/V, by name."""
        return dict(zip(self._memory_names, self.run_encoder(self._memory_names, input_ids, attention_mask)))

    def run_encoder(self, names: list[str], input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        """The encoder's outputs `names` (graphs/contract.py) as numpy; the rows its lookups read are read first."""
        self.shared_weights.fill_rows(input_ids)
        return self.encoder.run(names, {"input_ids": input_ids, "attention_mask": attention_mask})

    def encode_on_device(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, ort.OrtValue]:
        """encode(), its outputs left on the session's device (never copied through numpy).

        On the CPU the encoder runs on a few inputs at a time (encoder_chunks), writing into the batch's
        output buffers: its working memory (a layer's attention scores and FFN activations) is then bounded
        whatever the batch (mid-size int8 Pegasus, batch 8 x 512 tokens: the encode's peak RSS went from 439
        to 381 MB, benchmarks/profile_memory.py), while short inputs still share a run. In fp32 each input's encoding depends on that input alone (the padded length is the
        batch's), so the outputs are the same; int8 quantizes a run's activations with one scale, as it does
        a batched decoder step's. A GPU keeps the whole batch in one run: there, smaller runs would idle
        the device.
        """
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        chunks = encoder_chunks(*input_ids.shape) if self.device == "cpu" else [slice(0, len(input_ids))]
        if len(chunks) == 1:
            return self._encode_into(input_ids, attention_mask, outputs=None)
        first = self._encode_into(input_ids[chunks[0]], attention_mask[chunks[0]], outputs=None)
        batch = {name: np.empty((len(input_ids), *value.shape()[1:]), _NUMPY_DTYPES[value.data_type()])
                 for name, value in first.items()}  # fmt: skip
        for name, value in first.items():
            batch[name][chunks[0]] = value.numpy()
        for rows in chunks[1:]:
            self._encode_into(input_ids[rows], attention_mask[rows], {name: out[rows] for name, out in batch.items()})
        return {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in batch.items()}

    def _encode_into(self, input_ids, attention_mask, outputs: dict[str, np.ndarray] | None):
        """One encoder run; its outputs into `outputs` (host arrays, written in place), or left to onnxruntime."""
        self.shared_weights.fill_rows(input_ids)
        binding = self.encoder.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        for name in self._memory_names:
            if outputs is None:
                binding.bind_output(name, self.device)
            else:
                binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(outputs[name]))
        self.encoder.run_with_iobinding(binding)
        return dict(zip(self._memory_names, binding.get_outputs()))  # get_outputs() is in binding order

    def start(self, input_ids: np.ndarray, attention_mask: np.ndarray, rows: int, max_len: int):
        """Encode, then the StepFn of a search of `rows` rows and at most max_len decoder tokens."""
        if self.static_cache:
            return DecoderStep(self, self.encode_on_device(input_ids, attention_mask), rows, max_len)
        return CpuDecoderStep(self, self.encode(input_ids, attention_mask), rows)

    def decoder_step(self, memory: dict, rows: int, max_len: int):
        """The StepFn over encode()'s (numpy) or encode_on_device()'s memory."""
        if self.static_cache:
            return DecoderStep(self, memory, rows, max_len)
        return CpuDecoderStep(self, memory, rows)

    def teacher_forced_logits(self, input_ids, attention_mask, decoder_ids: np.ndarray) -> np.ndarray:
        """[batch, steps, vocab] float32 logits when the decoder is fed decoder_ids [batch, steps] (no beams)."""
        batch, steps = decoder_ids.shape
        step = self.start(input_ids, attention_mask, rows=batch, max_len=steps)
        rows = np.arange(batch, dtype=np.int64)
        # copy: a step returns its logits buffer, which the next step overwrites
        return np.stack([np.array(step(decoder_ids[:, t], rows), dtype=np.float32) for t in range(steps)], axis=1)


# What one CPU encoder run may hold: at most ENCODE_TOKENS input positions (rows x padded length), and
# no more rows x length^2 (a layer's attention work) than one input of ENCODE_SCORES_LENGTH tokens. One run
# per input kept the working memory at one input's, but short inputs then paid a run each: mid-size int8
# Pegasus, 8 inputs of 64 tokens, the encode took 62 ms one input a run and 37 ms in one run (a whole call,
# 8 beams, 16 new tokens: 0.685 -> 0.630 s, peak RSS 258 -> 260 MB). Two 256-token inputs in a run raised
# the peak of 8 x 256 calls by 13 MB (fp32 and int8) for no measurable gain, hence the second bound.
ENCODE_TOKENS = 512
ENCODE_SCORES_LENGTH = 256


def encoder_chunks(rows: int, length: int) -> list[slice]:
    """The batch's rows in consecutive runs within both bounds above (at least one row each)."""
    length = max(1, length)
    per_run = max(1, min(ENCODE_TOKENS // length, (ENCODE_SCORES_LENGTH // length) ** 2))
    return [slice(start, min(start + per_run, rows)) for start in range(0, rows, per_run)]


def _check_inputs(session: ort.InferenceSession, kv_names: list[str], directory: Path, decoder_contract: str) -> None:
    """The decoder graph must be of the contract the manifest says (a hand-edited manifest, a mixed directory)."""
    inputs = {value.name for value in session.get_inputs()}
    if not set(kv_names) <= inputs:
        raise ManifestError(
            f"{directory}: {contract.DECODER_FILE} lacks the inputs of the {decoder_contract!r} decoder contract "
            "its manifest names; export the model again"
        )


def _check_outputs(session: ort.InferenceSession, expected: list[str], directory: Path) -> None:
    missing = sorted(set(expected) - {output.name for output in session.get_outputs()})
    if missing:
        raise ManifestError(
            f"{directory}: the graphs lack outputs {missing}; the export was made by an older ortseq, export it again"
        )


class CpuDecoderStep:
    """A StepFn over the decoder session; the past starts empty and grows by one token per call.

    It runs through an IO binding so that nothing big crosses into numpy between steps: the cross
    K/V stay bound for the whole search, each step's present K/V (ORT-owned) are bound as the next
    step's past without a copy, and the logits land in one buffer allocated once. The returned
    logits array is that buffer: the search may use it as scratch, the next call overwrites it.
    """

    device = "cpu"  # where logits_value lives

    def __init__(self, sessions: EncoderDecoderSessions, memory: dict[str, np.ndarray], rows: int):
        dims = sessions.manifest.dims
        self._session = sessions.decoder
        self._fill_rows = sessions.shared_weights.fill_rows
        self._past_names = sessions.past_names
        self._binding = self._session.io_binding()
        self._inputs = dict(memory)  # bound arrays must outlive the binding's use of them
        self._inputs.update(
            dict.fromkeys(self._past_names, np.zeros((rows, dims.decoder_heads, 0, dims.head_dim), sessions.past_dtype))
        )
        for name, array in self._inputs.items():
            self._binding.bind_cpu_input(name, array)
        self._logits = np.empty((rows, dims.vocab_size), dtype=np.float32)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self._logits)
        self._present_names = contract.present_names(sessions.layers)

    @property
    def logits_value(self) -> ort.OrtValue:
        """The last step's logits [rows, vocab] float32 as an OrtValue (the returned array's memory)."""
        return self._logits_value

    def __call__(self, tokens: np.ndarray, beam_idx: np.ndarray) -> np.ndarray:
        self._inputs["input_ids"] = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1, 1)
        self._fill_rows(self._inputs["input_ids"])
        self._inputs["beam_idx"] = np.ascontiguousarray(beam_idx, dtype=np.int64)
        self._binding.bind_cpu_input("input_ids", self._inputs["input_ids"])
        self._binding.bind_cpu_input("beam_idx", self._inputs["beam_idx"])
        self._bind_outputs()
        self._session.run_with_iobinding(self._binding)
        presents = self._binding.get_outputs()[1:]
        for name, present in zip(self._past_names, presents):
            self._binding.bind_ortvalue_input(name, present)
        return self._logits

    def _bind_outputs(self) -> None:
        """Logits into our buffer; presents freshly allocated by ORT (they grow, and the last ones are now the past)."""
        self._binding.clear_binding_outputs()
        self._binding.bind_ortvalue_output("logits", self._logits_value)
        for name in self._present_names:
            self._binding.bind_output(name, "cpu")


class DecoderStep:
    """A StepFn over a static-cache decoder (graphs/contract.py, contract 0.3), for CPU and CUDA alike.

    Every buffer that lives across steps is allocated once, on the session's device (`device`), before
    the first step: the self-attention caches [rows, H, max_len, dh] (bound as each step's input AND
    output: the graph writes the new K/V in place, and beams reorder by indirection only), two cache
    indirection buffers (each step reads one and writes the other), the logits, and the step's small
    inputs (updated in place). The cross K/V and mask stay bound as the encoder left them. Per step,
    only the token ids, beam_idx, positions and the slot cross to the device, and the logits come back:
    on CPU the returned array IS the logits buffer (no copy; the search owns it until the next call).
    """

    def __init__(self, sessions: EncoderDecoderSessions, memory: dict, rows: int, max_len: int):
        dims = sessions.manifest.dims
        self.device = sessions.device
        self._session = sessions.decoder
        self._fill_rows = sessions.shared_weights.fill_rows
        self._binding = self._session.io_binding()
        self._max_len = max_len
        self._step = 0
        self._memory = {name: self._on_device(value) for name, value in memory.items()}  # bound: kept alive
        shape = (rows, dims.decoder_heads, max_len, dims.head_dim)
        self.cache_values = {
            name: ort.OrtValue.ortvalue_from_shape_and_type(shape, sessions.past_dtype, self.device, 0)
            for name in sessions.past_names
        }
        # two buffers (on CPU each wraps its own array): each step reads one and writes the other
        self.indirection_values = [self._on_device(np.zeros((rows, max_len), dtype=np.int32)) for _ in range(2)]
        self._small = {
            "input_ids": self._on_device(np.zeros((rows, 1), dtype=np.int64)),
            "beam_idx": self._on_device(np.zeros(rows, dtype=np.int64)),
            "position_ids": self._on_device(np.zeros(rows, dtype=np.int64)),
            "past_sequence_length": self._on_device(np.zeros(1, dtype=np.int32)),
        }
        self._host_logits = np.empty((rows, dims.vocab_size), dtype=np.float32)
        # on CPU the OrtValue wraps the host array (no copy back); on a GPU it is device memory
        self.logits_value = self._on_device(self._host_logits)
        self._bind(contract.present_names(sessions.layers))

    def _on_device(self, value) -> ort.OrtValue:
        """value (numpy or OrtValue) as an OrtValue on the device; a CPU numpy array is wrapped, not copied."""
        if isinstance(value, ort.OrtValue):
            return value
        return ort.OrtValue.ortvalue_from_numpy(value, self.device, 0)

    def _bind(self, present_names: list[str]) -> None:
        """Everything but the indirection, once for the whole search."""
        for name, value in [*self._memory.items(), *self._small.items(), *self.cache_values.items()]:
            self._binding.bind_ortvalue_input(name, value)
        for present, value in zip(present_names, self.cache_values.values()):
            self._binding.bind_ortvalue_output(present, value)  # the same buffer: written in place
        self._binding.bind_ortvalue_output("logits", self.logits_value)

    def __call__(self, tokens: np.ndarray, beam_idx: np.ndarray) -> np.ndarray:
        if self._step >= self._max_len:
            raise InvalidInputError(f"the search ran past the {self._max_len} decoder tokens this call allocated for")
        rows = self._host_logits.shape[0]
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(rows, 1)
        self._fill_rows(tokens)
        self._small["input_ids"].update_inplace(tokens)
        self._small["beam_idx"].update_inplace(np.ascontiguousarray(beam_idx, dtype=np.int64))
        self._small["position_ids"].update_inplace(np.full(rows, self._step, dtype=np.int64))
        self._small["past_sequence_length"].update_inplace(np.array([self._step], dtype=np.int32))
        read, written = self.indirection_values[self._step % 2], self.indirection_values[1 - self._step % 2]
        self._binding.bind_ortvalue_input("cache_indirection", read)
        self._binding.bind_ortvalue_output(contract.PRESENT_INDIRECTION, written)
        self._session.run_with_iobinding(self._binding)
        self._step += 1
        if self.device == "cpu":
            return self._host_logits
        return DeviceLogits(self.logits_value)


class DeviceLogits:
    """A step's logits left on the device: their shape for whoever needs only that (the search step
    graph reads logits_value itself), and np.asarray() copies them to the host, which only a step whose
    candidates are chosen on the host asks for. Nothing vocab-sized crosses otherwise."""

    def __init__(self, value: ort.OrtValue):
        self.value = value
        self.shape = tuple(value.shape())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        host = self.value.numpy()
        return host if dtype is None else host.astype(dtype)
