"""The graph contract: names, dtypes and shapes of every graph's inputs and outputs.

The exporter writes graphs with exactly these names, and the runtime feeds them by these names.
Axis names: ``batch`` (inputs), ``rows`` (batch * beams: one row per live hypothesis), ``src``
(encoder input length), ``mem`` (encoder output length: what cross-attention sees; src for plain
Pegasus, globals + src for LSG), ``past`` (tokens already decoded). ``H``/``dh`` are fixed per model.

Encoder (``encoder.onnx``)
    input_ids [batch, src] int64, attention_mask [batch, src] int64
    -> last_hidden_state [batch, mem, D] float,
       encoder_attention_mask [batch, mem] int64: the mask the decoder's cross-attention must use
       (the family decides it: e.g. LSG prepends its global tokens, mask_first_token hides token 0),
       cross_key_{l}, cross_value_{l} [batch, H, mem, dh] float for every decoder layer l.
    The cross-attention K/V are computed once per input and shared by all beams.

Decoder step (``decoder.onnx``), contract 0.3 ("static-cache"), one new token per row:
    input_ids [rows, 1] int64, encoder_attention_mask [batch, mem] int64 (the encoder's output),
    beam_idx [rows] int64 (which row of the previous step each row continues),
    position_ids [rows] int64 (each row's position, for the position embedding: rows of different
    ages may later share a batch), past_sequence_length [1] int32 (the cache slot this step writes =
    the number of tokens already cached), cache_indirection [rows, max_len] int32 (for row r and slot
    t < past_sequence_length: which beam of r's input holds r's K/V at slot t),
    cache_key_{l}, cache_value_{l} [rows, H, max_len, dh] (allocated once per generate() call by the
    runtime, for the call's max_length), cross_key_{l}, cross_value_{l} as above
    -> logits [rows, vocab] float32,
       present_cache_indirection [rows, max_len] int32 (the input's rows gathered by beam_idx, then
       slot past_sequence_length set to r % beams: each row's own buffer),
       present_key_{l}, present_value_{l}: the cache buffers themselves. The runtime binds each to
       its input's buffer; the graph writes the new K/V in place at slot past_sequence_length of row
       r's own buffer and copies nothing else of the cache. Beams are reordered by indirection only:
       cache rows never move. The runtime ping-pongs two indirection buffers.
    The self-attention body is recorded in the manifest (`decoder_self_attention`): "dmmha" (one
    com.microsoft DecoderMaskedMultiHeadAttention node per layer, head sizes 32/64/128) or "plain"
    (standard ONNX: ScatterND writes the slot in place, Gathers read the live slots through the
    indirection into transient tensors).
    rows must be a multiple of batch: row r belongs to input r // (rows / batch). The cross
    attention folds the beams of an input into its query axis instead of copying K/V per beam.

In-flight decoder step (``decoder_inflight.onnx``, optional: ``ortseq export --inflight``), the
static-cache step for rows of different requests and ages sharing one run (runtime/inflight.py):
requests of any beam count, age and source length mix. Axis ``requests``: the request entries that
hold cross K/V (one per request, however many beams it has).
    input_ids [rows, 1] int64, position_ids [rows] int64 (each row's position = the cache slot it
    writes = the tokens it has cached; slots after it are masked), beam_idx [rows] int64 (the row of
    the previous step each row continues: a row of the same request), row_base [rows] int64 (the row
    of beam 0 of r's request: its beams are rows row_base .. row_base + beams - 1),
    cache_indirection [rows, max_len] int32 (which beam of r's request holds r's K/V at slot t),
    cross_grid [requests, width] int64 (the rows whose queries each request's cross-attention takes:
    its beams' rows first, then any of them repeated), cross_slot [rows] int64 (each row's cell of
    that grid, flat: request * width + beam), cache_key_{l}, cache_value_{l} [rows, H, max_len, dh],
    encoder_attention_mask [requests, mem] int64 and cross_key_{l}, cross_value_{l}
    [requests, H, mem, dh]: padded to the longest request's mem (padding masked)
    -> logits, present_cache_indirection (slot position_ids[r] set to r - row_base[r]) and
       present_key_{l}, present_value_{l} as in contract 0.3 (written in place).
    Its self-attention is always the plain body.

Decoder step, concat contract ("concat": ortseq 0.2's decoder.onnx, still run; and the decoder
subgraph of ORT's BeamSearch op), past may be empty (past = 0):
    input_ids, encoder_attention_mask, beam_idx as above,
    past_key_{l}, past_value_{l} [rows, H, past, dh], cross_key_{l}, cross_value_{l} as above
    -> logits [rows, vocab] float, present_key_{l}, present_value_{l} [rows, H, past + 1, dh]
    (the past gathered by beam_idx, then concatenated with the new K/V: a new tensor every step).

Search step (``search_step.onnx``, optional: exports made before it run the search on the host),
the tensor part of choosing each step's candidates, run on the decoder's device:
    logits [rows, vocab] float32 (the decoder step's output, bound without a copy),
    log_probs [] bool (true in beam search: the scores are log_softmax(logits), as torch computes them
    (onnxruntime's LogSoftmax matched torch.log_softmax bitwise far more often than numpy did);
    false in greedy search: the raw logits),
    bias [1, vocab] float32 (the logits processors that ban the same ids in every row: 0, or -inf where
    banned; scores + bias),
    ban_ids [rows, bans] int64, ban_values [rows, bans] float32 (the ids each row's own tokens ban at this
    step: no-repeat and input n-grams, bad words; -inf, and padding that writes 0 or repeats a ban),
    running_scores [batch, beams] float32 (added to the rows' scores; zeros [rows, 1] in greedy search),
    k [1] int64 (2 * beams in beam search, 1 in greedy search)
    -> topk_scores [batch, k] float32, topk_ids [batch, k] int64: the k best of the input's
       beams * vocab scores, best first, ties to the lower flat index (beam * vocab + token), like torch.topk.
    Processors that read the scores' values (repetition penalties, remove_invalid_values), and a forced
    token (no score depends on the logits then), run on the host for that step (runtime/search_step.py).
"""

from __future__ import annotations

# onnx >= 1.23 writes IR version 14 by default, which onnxruntime 1.31 refuses; opset 17 needs IR 8.
IR_VERSION = 8

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
SEARCH_STEP_FILE = "search_step.onnx"
INFLIGHT_DECODER_FILE = "decoder_inflight.onnx"
SEARCH_STEP_INPUTS = ("logits", "log_probs", "bias", "ban_ids", "ban_values", "running_scores", "k")
SEARCH_STEP_OUTPUTS = ("topk_scores", "topk_ids")
# Optional: ONNX Runtime's BeamSearch op over Pegasus subgraphs, the whole search in one graph
# (exporter/beam_search_op.py documents its I/O; runtime/beam_search_op.py runs it).
BEAM_SEARCH_FILE = "beam_search.onnx"
# The token embeddings (and the LM head's weight), stored once for both graphs: their initializers name
# this file as external data, and the runtime loads it once and hands it to both sessions
# (exporter/shared_weights.py writes it, runtime/shared_weights.py reads it). Exports made before it
# keep a copy in each graph and still run.
SHARED_WEIGHTS_FILE = "embeddings.data"
# Of the tables in that file, those only token lookups read (the manifest's `lookup_tables`): a Gather,
# or GatherBlockQuantized, of their rows at the graph input `input_ids`. Readers of the whole table (the
# LM head) read the same bytes under another name (the table's name + WHOLE_TABLE_SUFFIX). So the runtime
# may hold just the rows a call looks up (runtime/shared_weights.py): a lookup reads nothing else.
LOOKUP_IDS = "input_ids"
WHOLE_TABLE_SUFFIX = ".whole"

ENCODER_INPUTS = ("input_ids", "attention_mask")
DECODER_STATIC_INPUTS = ("input_ids", "encoder_attention_mask", "beam_idx")
DECODER_STEP_INPUTS = (*DECODER_STATIC_INPUTS, "position_ids", "past_sequence_length", "cache_indirection")
PRESENT_INDIRECTION = "present_cache_indirection"
INFLIGHT_STEP_INPUTS = (
    *("input_ids", "encoder_attention_mask", "beam_idx", "position_ids", "row_base", "cache_indirection"),
    *("cross_grid", "cross_slot"),
)

# The decoder contracts (the manifest's `decoder_contract`); manifests written before it name none: concat.
CONCAT_CONTRACT = "concat"
STATIC_CACHE_CONTRACT = "static-cache"
DECODER_CONTRACTS = (CONCAT_CONTRACT, STATIC_CACHE_CONTRACT)
# The static-cache decoder's self-attention bodies (the manifest's `decoder_self_attention`)
DMMHA_BODY = "dmmha"  # com.microsoft DecoderMaskedMultiHeadAttention: reads and writes the cache in place
PLAIN_BODY = "plain"  # standard ONNX ops: ScatterND writes the slot in place, Gathers read the live slots
SELF_ATTENTION_BODIES = (DMMHA_BODY, PLAIN_BODY)


# Every K/V tensor name (past, cache, present, cross) starts with one of these (see the names below);
# present_cache_indirection does too, but it is int32 (what reads these prefixes looks at float tensors).
KV_NAME_PREFIXES = ("past_", "cache_key_", "cache_value_", "present_", "cross_")


def cross_names(num_layers: int) -> list[str]:
    """Names of the cross-attention K/V tensors, in graph order (key, value per layer)."""
    return [name for layer in range(num_layers) for name in (f"cross_key_{layer}", f"cross_value_{layer}")]


def past_names(num_layers: int) -> list[str]:
    return [name for layer in range(num_layers) for name in (f"past_key_{layer}", f"past_value_{layer}")]


def cache_names(num_layers: int) -> list[str]:
    """The static cache's buffers (contract 0.3), bound as inputs and, as present_names, outputs."""
    return [name for layer in range(num_layers) for name in (f"cache_key_{layer}", f"cache_value_{layer}")]


def present_names(num_layers: int) -> list[str]:
    return [name for layer in range(num_layers) for name in (f"present_key_{layer}", f"present_value_{layer}")]


def encoder_outputs(num_layers: int) -> list[str]:
    return ["last_hidden_state", "encoder_attention_mask", *cross_names(num_layers)]


def decoder_inputs(num_layers: int) -> list[str]:
    return [*DECODER_STEP_INPUTS, *cache_names(num_layers), *cross_names(num_layers)]


def decoder_outputs(num_layers: int) -> list[str]:
    return ["logits", PRESENT_INDIRECTION, *present_names(num_layers)]


def inflight_decoder_inputs(num_layers: int) -> list[str]:
    return [*INFLIGHT_STEP_INPUTS, *cache_names(num_layers), *cross_names(num_layers)]


def inflight_decoder_dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    """As the static-cache decoder's, with request entries in place of the batch axis."""
    axes = decoder_dynamic_axes(num_layers) | {
        "encoder_attention_mask": {0: "requests", 1: "mem"},
        "row_base": {0: "rows"},
        "cross_grid": {0: "requests", 1: "width"},
        "cross_slot": {0: "rows"},
    }
    for name in cross_names(num_layers):
        axes[name] = {0: "requests", 2: "mem"}
    return axes


def concat_decoder_inputs(num_layers: int) -> list[str]:
    return [*DECODER_STATIC_INPUTS, *past_names(num_layers), *cross_names(num_layers)]


def concat_decoder_outputs(num_layers: int) -> list[str]:
    return ["logits", *present_names(num_layers)]


def encoder_dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "src"} for name in ENCODER_INPUTS}
    axes["last_hidden_state"] = {0: "batch", 1: "mem"}
    axes["encoder_attention_mask"] = {0: "batch", 1: "mem"}
    for name in cross_names(num_layers):
        axes[name] = {0: "batch", 2: "mem"}
    return axes


def decoder_dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "rows"},
        "encoder_attention_mask": {0: "batch", 1: "mem"},
        "beam_idx": {0: "rows"},
        "position_ids": {0: "rows"},
        "cache_indirection": {0: "rows", 1: "max_len"},
        "logits": {0: "rows"},
        PRESENT_INDIRECTION: {0: "rows", 1: "max_len"},
    }
    for name in [*cache_names(num_layers), *present_names(num_layers)]:
        axes[name] = {0: "rows", 2: "max_len"}
    for name in cross_names(num_layers):
        axes[name] = {0: "batch", 2: "mem"}
    return axes


def concat_decoder_dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "rows"},
        "encoder_attention_mask": {0: "batch", 1: "mem"},
        "beam_idx": {0: "rows"},
        "logits": {0: "rows"},
    }
    for name in past_names(num_layers):
        axes[name] = {0: "rows", 2: "past"}
    for name in present_names(num_layers):
        axes[name] = {0: "rows", 2: "past_plus_1"}
    for name in cross_names(num_layers):
        axes[name] = {0: "batch", 2: "mem"}
    return axes
