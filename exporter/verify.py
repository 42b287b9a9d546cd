"""Check every exported graph against its PyTorch module at shapes other than the traced ones.

The tracer records one run; shape-dependent code that it specialised would only show at other
batch sizes, lengths and past lengths, so those are what we run. Export fails on any mismatch.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..graphs import contract
from ..graphs.manifest import BEAM_SEARCH_OP_ENGINE
from .checkpoint_check import load_checkpoint_tensors
from .progress import log

# fp32 graphs compute the same math in another order: differences are rounding, ~1e-6 relative.
RTOL = 1e-4
ATOL = 1e-4


class GraphMismatchError(RuntimeError):
    """An exported graph disagrees with PyTorch; the export is not usable."""


@dataclass(frozen=True)
class DecoderCase:
    batch: int
    beams: int
    src: int
    past: int


# Traced at batch 2, src 9, beams 2, past 3 (see pipeline.py): every case here differs from that.
ENCODER_CASES = ((1, 1), (3, 13), (1, None))  # (batch, src); None = max_position_embeddings
DECODER_CASES = (DecoderCase(1, 1, 1, 0), DecoderCase(3, 2, 11, 5), DecoderCase(2, 4, 7, 1), DecoderCase(1, 3, None, 2))


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _compare(what: str, got: list[np.ndarray], want: list[torch.Tensor], names: list[str]) -> float:
    worst = 0.0
    for name, g, w in zip(names, got, want):
        w = w.detach().numpy()
        if g.shape != w.shape:
            raise GraphMismatchError(f"{what}: output {name} has shape {g.shape}, PyTorch gives {w.shape}")
        err = float(np.max(np.abs(g - w))) if g.size else 0.0
        if not np.allclose(g, w, rtol=RTOL, atol=ATOL):
            raise GraphMismatchError(f"{what}: output {name} differs from PyTorch by up to {err:.3g}")
        worst = max(worst, err)
    return worst


def _random_batch(rng: np.random.Generator, batch: int, src: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.integers(3, vocab, size=(batch, src), dtype=np.int64)
    mask = np.ones((batch, src), dtype=np.int64)
    for row in range(1, batch):  # later rows padded on the right, as a tokenizer batch is
        mask[row, max(1, src - 3 * row) :] = 0
    return ids, mask


def verify_encoder(
    path: Path, module: torch.nn.Module, num_layers: int, vocab: int, max_len: int, extra_lengths=()
) -> float:
    """extra_lengths: more source lengths the family wants checked (batch 2, one row padded)."""
    session, rng, worst = _session(path), np.random.default_rng(1), 0.0
    names = contract.encoder_outputs(num_layers)
    cases = [*ENCODER_CASES, *((2, length) for length in extra_lengths)]
    for batch, src in cases:
        src = src or max_len
        ids, mask = _random_batch(rng, batch, src, vocab)
        got = session.run(names, {"input_ids": ids, "attention_mask": mask})
        with torch.no_grad():
            want = module(torch.from_numpy(ids), torch.from_numpy(mask))
        worst = max(worst, _compare(f"encoder at batch {batch}, length {src}", got, list(want), names))
    log(f"verified {path.name} at {len(cases)} new shapes (max abs diff {worst:.2g})")
    return worst


def verify_decoder(path: Path, module: torch.nn.Module, dims) -> float:
    """The static-cache decoder (graphs/contract.py) against its module, run as the runtime runs it: the
    cache buffers bound as both input and output (DMMHA writes into the bound buffer only), beams
    reordered within each input, rows of different positions, random indirection."""
    session, rng, worst = _session(path), np.random.default_rng(2), 0.0
    names = contract.decoder_outputs(dims.decoder_layers)
    for case in DECODER_CASES:
        feeds = _decoder_feeds(rng, case, dims)
        ordered = [torch.from_numpy(feeds[name]) for name in contract.decoder_inputs(dims.decoder_layers)]
        with torch.no_grad():
            want = module(*ordered)
        worst = max(worst, _compare(f"decoder at {case}", _run_in_place(session, feeds, dims), list(want), names))
    log(f"verified {path.name} at {len(DECODER_CASES)} new shapes (max abs diff {worst:.2g})")
    return worst


def _run_in_place(session, feeds: dict[str, np.ndarray], dims) -> list[np.ndarray]:
    """A static-cache step's outputs (logits, indirection, then the caches), run with copies of the cache
    feeds bound as both input and output, as the runtime binds them (DMMHA writes into the bound buffer only)."""
    names, cache_names = contract.decoder_outputs(dims.decoder_layers), contract.cache_names(dims.decoder_layers)
    cache = {name: feeds[name].copy() for name in cache_names}
    binding = session.io_binding()
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in cache.items()}  # bound in place
    for name, array in feeds.items():
        if name in values:
            binding.bind_ortvalue_input(name, values[name])
        else:
            binding.bind_cpu_input(name, array)
    for name in names[:2]:
        binding.bind_output(name, "cpu")
    for cache_name, present in zip(cache_names, names[2:]):
        binding.bind_ortvalue_output(present, values[cache_name])
    session.run_with_iobinding(binding)
    got = [output.numpy() for output in binding.get_outputs()[:2]]  # in binding order: logits, indirection
    return got + [cache[name] for name in cache_names]


def verify_inflight_decoder(path: Path, module: torch.nn.Module, dims) -> float:
    """decoder_inflight.onnx against its module, run as the scheduler runs it (caches bound in place):
    requests of 1, 2 and 3 beams in rows of different positions, sources of different lengths."""
    session, rng, worst = _session(path), np.random.default_rng(3), 0.0
    names = contract.decoder_outputs(dims.decoder_layers)
    beams, max_len, src = (3, 1, 2, 1), 9, 11
    rows, requests, width = sum(beams), len(beams), max(beams)
    first_rows = np.cumsum((0, *beams[:-1]))
    row_base = np.repeat(first_rows, beams)
    beam_of_row = np.arange(rows) - row_base
    request_of_row = np.repeat(np.arange(requests), beams)
    mask = np.ones((requests, src), dtype=np.int64)
    for request, length in enumerate((src, 4, 7, 1)):
        mask[request, length:] = 0
    grid = np.stack([first + np.minimum(np.arange(width), count - 1) for first, count in zip(first_rows, beams)])
    positions = np.repeat(rng.integers(0, max_len, size=requests), beams)
    beam_counts = np.repeat(beams, beams)
    feeds = {
        "input_ids": rng.integers(3, dims.vocab_size, size=(rows, 1), dtype=np.int64),
        "encoder_attention_mask": mask,
        "beam_idx": (row_base + rng.integers(0, 3, size=rows) % beam_counts).astype(np.int64),
        "position_ids": positions.astype(np.int64),
        "row_base": row_base.astype(np.int64),
        "cache_indirection": (rng.integers(0, 3, size=(rows, max_len)) % beam_counts[:, None]).astype(np.int32),
        "cross_grid": grid.astype(np.int64),
        "cross_slot": (request_of_row * width + beam_of_row).astype(np.int64),
    }
    kv = (dims.decoder_heads, dims.head_dim)
    for name in contract.cache_names(dims.decoder_layers):
        feeds[name] = rng.standard_normal((rows, kv[0], max_len, kv[1]), dtype=np.float32)
    for name in contract.cross_names(dims.decoder_layers):
        feeds[name] = rng.standard_normal((requests, kv[0], src, kv[1]), dtype=np.float32)
    ordered = [torch.from_numpy(feeds[name]) for name in contract.inflight_decoder_inputs(dims.decoder_layers)]
    with torch.no_grad():
        want = module(*ordered)
    worst = _compare("in-flight decoder", _run_in_place(session, feeds, dims), list(want), names)
    log(f"verified {path.name} (max abs diff {worst:.2g})")
    return worst


def _decoder_feeds(rng: np.random.Generator, case: DecoderCase, dims) -> dict[str, np.ndarray]:
    src = case.src or dims.max_position_embeddings
    rows, max_len = case.batch * case.beams, case.past + 3
    _, mask = _random_batch(rng, case.batch, src, dims.vocab_size)
    parents = rng.integers(0, case.beams, size=rows) + np.repeat(np.arange(case.batch) * case.beams, case.beams)
    feeds = {
        "input_ids": rng.integers(3, dims.vocab_size, size=(rows, 1), dtype=np.int64),
        "encoder_attention_mask": mask,
        "beam_idx": parents.astype(np.int64),  # a real reorder within each input, not the identity
        "position_ids": rng.integers(0, dims.max_position_embeddings, size=rows, dtype=np.int64),
        "past_sequence_length": np.array([case.past], dtype=np.int32),
        "cache_indirection": rng.integers(0, case.beams, size=(rows, max_len), dtype=np.int32),
    }
    kv_shape = (dims.decoder_heads, dims.head_dim)
    for name in contract.cache_names(dims.decoder_layers):
        feeds[name] = rng.standard_normal((rows, kv_shape[0], max_len, kv_shape[1]), dtype=np.float32)
    for name in contract.cross_names(dims.decoder_layers):
        feeds[name] = rng.standard_normal((case.batch, kv_shape[0], src, kv_shape[1]), dtype=np.float32)
    return feeds


# Short searches keep the check cheap on real-size models; forced EOS and finished beams still occur.
BEAM_SEARCH_OP_NEW_TOKENS = 16


def verify_beam_search_op(directory: Path) -> None:
    """The BeamSearch-op engine must return the loop engine's tokens, on a padded batch read back from
    the export directory: greedy, and the model's beam count with early stopping (what the engine
    supports), at the model's other defaults (length penalty, n-gram ban, lengths)."""
    from ..runtime import Seq2SeqModel  # the runtime the export will be used with

    loop = Seq2SeqModel.load(directory, verify=False)
    op = Seq2SeqModel.load(directory, verify=False, engine=BEAM_SEARCH_OP_ENGINE)
    dims, defaults = loop.manifest.dims, loop.manifest.generation
    ids, mask = _random_batch(np.random.default_rng(4), 3, min(24, dims.max_position_embeddings), dims.vocab_size)
    searches = {
        "greedy": {"num_beams": 1},
        f"{max(2, defaults.num_beams)} beams": {"num_beams": max(2, defaults.num_beams), "early_stopping": True},
    }
    new_tokens = min(BEAM_SEARCH_OP_NEW_TOKENS, loop.settings().max_length - 1)  # within the model's own limit
    for name, settings in searches.items():
        settings |= {"max_new_tokens": new_tokens}
        expected, got = loop.generate(ids, mask, **settings), op.generate(ids, mask, **settings)
        if got.shape != expected.shape or not np.array_equal(got, expected):
            raise GraphMismatchError(f"{contract.BEAM_SEARCH_FILE}, {name}: tokens differ from ortseq's search loop")
    log(f"verified {contract.BEAM_SEARCH_FILE}: the loop's tokens in {len(searches)} searches")


# ---------------------------------------------------------------- against transformers' own model
#
# The checks above compare each graph with the module it was traced from: ortseq's own rewrite of the
# forward pass, built on ortseq's own load. They catch what tracing got wrong, not what the rewrite or
# the load got wrong. The check below compares the export, run by the runtime, with transformers.

# Logits, as a fraction of the largest |logit|: two fp32 computations of the same math in another order
# differ by rounding (unit roundoff 6e-8) amplified through the layers and the sums over d_model. On the
# tiny test models (strong random weights, which amplify rounding most) transformers' own fp32 logits
# differ from its float64 ones by up to 3.5e-5 (BertGeneration), ours from transformers' fp32 by up to
# 1.9e-5; two correct fp32 implementations may differ by the sum of their rounding. 1e-3 leaves deeper
# real models thirty times that; a sign-flipped weight matrix, a skipped LayerNorm or a missing embedding
# scale moved the tiny models' logits by 0.5 to 1.6. The tokens are compared exactly.
LOGITS_RTOL = 1e-3
REFERENCE_DECODER_PREFIX = 4  # teacher-forced decoder tokens: the prefixes of length 1 to 4 are checked
REFERENCE_NEW_TOKENS = 8
REFERENCE_MAX_SOURCE = 16


def verify_against_transformers(directory: Path, family, checkpoint: Path, graph_tensors=None) -> None:
    """The export in `directory`, run by ortseq's runtime, against the checkpoint as transformers loads
    and runs it (`family.reference_model`): the logits of the model class's own forward for a few
    decoder prefixes, on a padded batch of three source lengths; then the tokens of transformers' own
    generate(), greedy and 4 beams, on the padded batch, exactly. A mismatch raises GraphMismatchError.

    What this does not take from ortseq: the reference side is transformers' from_pretrained, forward
    and generate(), so a wrong load (family.load_model), a wrong rewrite (EncoderExport/DecoderExport),
    wrong generation defaults in the manifest or a wrong search all show. What it does take: the inputs,
    and the checkpoint FILES: transformers' load is made to hold the files' tensors by the family's
    checkpoint_layout (exporter/checkpoint_check.py), as ortseq's own load is, because 5.x leaves some
    tensors of 4.x checkpoints random. The files are not ortseq's: a tensor ortseq's load or rewrite gets
    wrong after that check still differs from the reference.

    LSG-Pegasus (family.reference_encoder false): transformers has no LSG encoder, so the export's
    encoder output (memory and its mask, globals included) is given to transformers' own Pegasus
    decoder as `encoder_outputs`. That checks, against transformers, the decoder graph, the cross K/V
    the encoder graph computes from the memory, the LM head and the search; it cannot check the memory
    itself. The encoder rests on the LSG spec (graphs/lsg.py, the op tested against it) and on the
    reference code's goldens (tests/fixtures/lsg: states, logits, tokens), checked in the test suite
    for the fixtures' configurations, not at export for the checkpoint being exported.
    """
    from transformers.utils import logging as hf_logging

    from ..runtime import Seq2SeqModel

    ours = Seq2SeqModel.load(directory, verify=False)
    gc.collect()  # the model the graphs were built from is released by now: free it before loading another copy
    reference = family.reference_model(str(checkpoint))
    # the files are the ground truth for both sides: what transformers 5.x leaves random in a 4.x checkpoint
    # (untied Pegasus' embed_tokens, tie_encoder_decoder's decoder) is taken from them, the same repair
    # the export's own load gets (pipeline.load_checked_model) but applied to transformers' own load
    # (graph_tensors: what the export's graphs read; a tensor the files lack and none reads, left as loaded)
    load_checkpoint_tensors(reference, Path(checkpoint), family.checkpoint_layout(reference), graph_tensors)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # generate() warns about settings it overrides; they are the same on both sides
    try:
        ids, mask, decoder_ids = _reference_batch(ours.manifest)
        error = _check_logits(ours, reference, family, ids, mask, decoder_ids)
        searches = _check_generate(ours, reference, family, ids, mask)
    finally:
        hf_logging.set_verbosity(verbosity)
    log(
        f"verified against transformers' {type(reference).__name__}: logits (error {error:.2g} of the largest "
        f"logit) and the tokens of {searches} searches on a padded batch"
    )


def _reference_batch(manifest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, decoder_ids): three rows, right-padded, of the longest source we try,
    about half of it, and one token; decoder rows start with the decoder start token."""
    dims, special = manifest.dims, manifest.special_tokens
    rng = np.random.default_rng(5)
    specials = [special.pad_token_id, special.eos_token_id, special.decoder_start_token_id]
    ordinary = np.setdiff1d(np.arange(dims.vocab_size), specials)
    longest = min(REFERENCE_MAX_SOURCE, dims.max_position_embeddings)
    lengths = [longest, longest // 2 + 1, 1]
    ids = np.full((len(lengths), longest), special.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length], mask[row, :length] = rng.choice(ordinary, size=length), 1
    decoder_ids = rng.choice(ordinary, size=(len(lengths), REFERENCE_DECODER_PREFIX)).astype(np.int64)
    decoder_ids[:, 0] = special.decoder_start_token_id
    return ids, mask, decoder_ids


def _reference_inputs(ours, family, ids: np.ndarray, mask: np.ndarray, dtype=torch.float32) -> dict:
    """transformers' inputs: the ids, or (LSG) the export's encoder output in their place."""
    if family.reference_encoder:
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    from transformers.modeling_outputs import BaseModelOutput

    memory, memory_mask = ours.sessions.run_encoder(["last_hidden_state", "encoder_attention_mask"], ids, mask)
    memory = BaseModelOutput(last_hidden_state=torch.from_numpy(memory).to(dtype))
    return {"encoder_outputs": memory, "attention_mask": torch.from_numpy(memory_mask)}


def _check_logits(ours, reference, family, ids: np.ndarray, mask: np.ndarray, decoder_ids: np.ndarray) -> float:
    """Largest |ours - transformers| over the largest |logit| (at least 1); raises above LOGITS_RTOL."""
    got = ours.sessions.teacher_forced_logits(ids, mask, decoder_ids)
    with torch.no_grad():
        inputs = _reference_inputs(ours, family, ids, mask)
        want = reference(**inputs, decoder_input_ids=torch.from_numpy(decoder_ids)).logits.numpy()
    if got.shape != want.shape:
        raise GraphMismatchError(f"logits have shape {got.shape}, transformers' {want.shape}")
    error = float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))
    if not error <= LOGITS_RTOL:  # `not <=`: a NaN fails too
        raise GraphMismatchError(
            f"logits differ from transformers' {type(reference).__name__}.forward by {error:.3g} of the largest "
            f"logit (tolerance {LOGITS_RTOL:g}) on a batch of source lengths {mask.sum(axis=1).tolist()}"
        )
    return error


def _check_generate(ours, reference, family, ids: np.ndarray, mask: np.ndarray) -> int:
    """Greedy and 4 beams at the model's other defaults: ours must equal transformers' tokens. Where they
    differ, transformers in float64 must give ours: an fp32 near-tie that rounding breaks either way."""
    searches = {"greedy": {"num_beams": 1}, "4 beams": {"num_beams": 4}}
    ignored = _ignored_fields_switched_off(ours.manifest)
    for name, settings in searches.items():
        # at least half the steps run: random inputs may make a model end at once, and then nothing is compared
        settings |= {"max_new_tokens": REFERENCE_NEW_TOKENS, "min_new_tokens": REFERENCE_NEW_TOKENS // 2}
        got = ours.generate(ids, mask, **settings)
        settings |= ignored
        want = _reference_generate(reference, _reference_inputs(ours, family, ids, mask), settings)
        if _same(got, want):
            continue
        wide = copy.deepcopy(reference).double()
        if _same(got, _reference_generate(wide, _reference_inputs(ours, family, ids, mask, torch.float64), settings)):
            continue
        raise GraphMismatchError(
            f"{name}: tokens differ from transformers' generate() {_first_difference(got, want)} "
            f"(source lengths {mask.sum(axis=1).tolist()}, settings {settings})"
        )
    return len(searches)


def _ignored_fields_switched_off(manifest) -> dict:
    """Fields exported with --ignore-generation-fields, at transformers' own defaults: transformers would
    apply them from the checkpoint's generation config (do_sample=True samples), the export does not, and
    the comparison is of the search the export runs."""
    from transformers import GenerationConfig

    defaults = GenerationConfig()
    return {name: getattr(defaults, name) for name in manifest.ignored_generation_fields if hasattr(defaults, name)}


def _reference_generate(reference, inputs: dict, settings: dict) -> np.ndarray:
    with torch.no_grad():
        return reference.generate(**inputs, **settings).numpy()


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    return got.shape == want.shape and np.array_equal(got, want)


def _first_difference(got: np.ndarray, want: np.ndarray) -> str:
    """'at row r, position p (ours x, transformers y)'; an end of sequence reads as 'none'."""
    rows, steps = max(got.shape[0], want.shape[0]), max(got.shape[1], want.shape[1])
    for position in range(steps):
        for row in range(rows):
            mine, theirs = (_token(a, row, position) for a in (got, want))
            if mine != theirs:
                return f"first at row {row}, position {position} (ours {mine}, transformers {theirs})"
    return "in shape"


def _token(tokens: np.ndarray, row: int, position: int) -> str:
    return str(tokens[row, position]) if row < tokens.shape[0] and position < tokens.shape[1] else "none"
