"""Check every exported graph against its PyTorch module at shapes other than the traced ones.

The tracer records one run; shape-dependent code that it specialised would only show at other
batch sizes, lengths and past lengths, so those are what we run. Export fails on any mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ortseq.exporter.progress import log
from ortseq.graphs import contract
from ortseq.graphs.manifest import BEAM_SEARCH_OP_ENGINE

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


def verify_decoder(
    path: Path, module: torch.nn.Module, num_layers: int, heads: int, head_dim: int, vocab: int, max_len: int
) -> float:
    session, rng, worst = _session(path), np.random.default_rng(2), 0.0
    names = contract.decoder_outputs(num_layers)
    for case in DECODER_CASES:
        src = case.src or max_len
        rows = case.batch * case.beams
        _, mask = _random_batch(rng, case.batch, src, vocab)
        feeds = {
            "input_ids": rng.integers(3, vocab, size=(rows, 1), dtype=np.int64),
            "encoder_attention_mask": mask,
            "beam_idx": rng.permutation(rows).astype(np.int64),  # a real reorder, not the identity
        }
        for name in contract.past_names(num_layers):
            feeds[name] = rng.standard_normal((rows, heads, case.past, head_dim), dtype=np.float32)
        for name in contract.cross_names(num_layers):
            feeds[name] = rng.standard_normal((case.batch, heads, src, head_dim), dtype=np.float32)
        got = session.run(names, feeds)
        ordered = [torch.from_numpy(feeds[name]) for name in contract.decoder_inputs(num_layers)]
        with torch.no_grad():
            want = module(*ordered)
        worst = max(worst, _compare(f"decoder at {case}", got, list(want), names))
    log(f"verified {path.name} at {len(DECODER_CASES)} new shapes (max abs diff {worst:.2g})")
    return worst


# Short searches keep the check cheap on real-size models; forced EOS and finished beams still occur.
BEAM_SEARCH_OP_NEW_TOKENS = 16


def verify_beam_search_op(directory: Path) -> None:
    """The BeamSearch-op engine must return the loop engine's tokens, on a padded batch read back from
    the export directory: greedy, and the model's beam count with early stopping (what the engine
    supports), at the model's other defaults (length penalty, n-gram ban, lengths)."""
    from ortseq.runtime import Seq2SeqModel  # the runtime the export will be used with

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
