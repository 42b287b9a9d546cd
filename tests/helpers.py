"""Helpers the test modules share (pyproject's pytest `pythonpath = ["tests"]` makes `import helpers` work
under plain `pytest` as under `python -m pytest`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ortseq.exporter.tiny.kit import peaked
from ortseq.exporter.tiny.pegasus import TinyPegasusShape

ROOT = Path(__file__).resolve().parent.parent


def ortseq(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ortseq.runtime.cli", *args],
        input=stdin, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300,
    )  # fmt: skip


# Shapes chosen to break shape assumptions: odd head counts, head_dim not a power of two,
# asymmetric encoder/decoder depth, vocab sizes that are not multiples of 8, short position tables.
SHAPES = {
    "base": TinyPegasusShape(),
    "odd_heads": TinyPegasusShape(
        d_model=60, heads=3, encoder_layers=3, decoder_layers=1, ffn_dim=72, extra_vocab=6,
        max_position_embeddings=64, eos_logit_bias=4.0,
    ),
    "deep_decoder": TinyPegasusShape(
        d_model=32, heads=2, encoder_layers=1, decoder_layers=3, ffn_dim=48, extra_vocab=1,
        max_position_embeddings=40, eos_logit_bias=1.5, tie_embeddings=True,
    ),
    # head_dim 32: the decoder's self-attention is onnxruntime's DecoderMaskedMultiHeadAttention (the
    # others' head sizes, 16 and 20, get the plain-ONNX body): graphs/contract.py, exporter/attention.py
    "head32": TinyPegasusShape(
        d_model=64, heads=2, encoder_layers=1, decoder_layers=2, ffn_dim=96, extra_vocab=3,
        max_position_embeddings=48, eos_logit_bias=3.0,
    ),
}  # fmt: skip


SETTINGS = {
    "greedy": dict(num_beams=1, max_new_tokens=12),
    "greedy_min_new_tokens": dict(num_beams=1, max_new_tokens=15, min_new_tokens=6),
    "greedy_no_repeat_2": dict(num_beams=1, max_new_tokens=20, no_repeat_ngram_size=2),
    "beam2_lp1": dict(num_beams=2, max_new_tokens=14, length_penalty=1.0),
    "beam4_lp06": dict(num_beams=4, max_new_tokens=14, length_penalty=0.6),
    "beam8_lp2": dict(num_beams=8, max_new_tokens=14, length_penalty=2.0),
    "beam4_no_repeat_3": dict(num_beams=4, max_new_tokens=20, no_repeat_ngram_size=3),
    # all four returned: which finished hypotheses early stopping keeps shows in the later ones
    "beam4_early_stopping": dict(num_beams=4, max_new_tokens=16, early_stopping=True, num_return_sequences=4),
    "beam4_early_stopping_never": dict(num_beams=4, max_new_tokens=16, early_stopping="never", length_penalty=2.0),
    "beam4_early_stopping_never_lp1": dict(
        num_beams=4, max_new_tokens=16, early_stopping="never", length_penalty=1.0, num_return_sequences=4
    ),
    "beam4_return4": dict(num_beams=4, max_new_tokens=12, num_return_sequences=4),
    "beam8_return3_early": dict(num_beams=8, max_new_tokens=12, num_return_sequences=3, early_stopping=True),
    "beam2_min_new_tokens": dict(num_beams=2, max_new_tokens=16, min_new_tokens=7),
    "model_defaults": dict(),  # the checkpoint's generation config: 4 beams, length penalty 0.6, max length 32
}

# The same case without the setting: these values in its place must give other tokens, or the case checks
# nothing. Settings not listed (plain greedy and beam widths, the model's defaults, num_return_sequences,
# which changes the shape) are checked for varied lengths only.
WITHOUT_SETTING = {
    "greedy_min_new_tokens": {"min_new_tokens": 0},
    "greedy_no_repeat_2": {"no_repeat_ngram_size": 0},
    "beam2_lp1": {"length_penalty": 0.6},  # the model's default
    "beam4_lp06": {"length_penalty": 1.0},
    "beam8_lp2": {"length_penalty": 1.0},
    "beam4_no_repeat_3": {"no_repeat_ngram_size": 0},
    "beam4_early_stopping": {"early_stopping": False},
    "beam4_early_stopping_never": {"early_stopping": False},
    "beam4_early_stopping_never_lp1": {"early_stopping": False},
    "beam8_return3_early": {"early_stopping": False},
    "beam2_min_new_tokens": {"min_new_tokens": 0},
}

# Settings that decide something only on a model with a likelier end token (exporter/tiny/kit.py `peaked`)
PEAKED_SETTINGS = {"beam8_lp2", "beam4_early_stopping_never"}
PEAKED_SUFFIX = "_peaked"


def with_peaked(models: dict) -> dict:
    """models (name -> tiny shape) and, for each, its `peaked` twin named name + PEAKED_SUFFIX."""
    return models | {name + PEAKED_SUFFIX: peaked(shape) for name, shape in models.items()}


def parity_shape(shape: str, setting: str) -> str:
    """The model a parity case of this model and setting runs on (the peaked twin for PEAKED_SETTINGS)."""
    return shape + PEAKED_SUFFIX if setting in PEAKED_SETTINGS else shape


def seed_of(models: dict, name: str) -> int:
    """The build seed of a model of with_peaked(models): its place in models, the peaked twin's model's."""
    return list(models).index(name.removesuffix(PEAKED_SUFFIX)) + 1


def parity_lengths(max_len: int) -> list[int]:
    """Rows of a parity batch: the longest input, middling, short and one-token ones."""
    return [max_len, max_len // 2 + 1, 1, 3, max_len // 3, 9, max_len - 5, 2]


SEARCH_SEEDS = 32  # inputs tried per case before it is declared degenerate


def generated_lengths(out: np.ndarray, eos: int) -> list[int]:
    """Tokens each row generated up to its first end token (the width when it has none)."""
    ends = out[:, 1:] == eos
    return [int(np.argmax(row)) + 1 if row.any() else out.shape[1] - 1 for row in ends]


def degenerate(out: np.ndarray, without: np.ndarray | None, max_new_tokens: int, eos: int) -> str | None:
    """Why tokens `out` would check little (None when they discriminate): every row ends at step 1, or
    every row runs to max_new_tokens (no hypothesis finished early: finished-hypothesis scoring never
    decided anything), or every row has the same length, or the case without its setting gives the same."""
    lengths = generated_lengths(out, eos)
    if all(length == 1 for length in lengths):
        return "every row ends at step 1"
    if all(length >= max_new_tokens for length in lengths):
        return "every row runs to the maximum"
    if len(set(lengths)) < 2:
        return "every row has the same length"
    if without is not None and without.shape == out.shape and np.array_equal(without, out):
        return "the setting changes nothing"
    return None


def discriminating_batch(torch_model, setting: str, make_batch, first_seed: int, eos: int, settings=None):
    """(ids, mask, transformers' tokens) of the first seed from first_seed whose batch (make_batch(seed))
    discriminates for this setting (see `degenerate`); AssertionError if none of SEARCH_SEEDS does.
    settings: the generate() arguments of the case (default SETTINGS[setting])."""
    settings = SETTINGS[setting] if settings is None else settings
    max_new = settings.get("max_new_tokens", torch_model.generation_config.max_length - 1)
    reasons = []
    for seed in range(first_seed, first_seed + SEARCH_SEEDS):
        ids, mask = make_batch(seed)
        expected = torch_generate(torch_model, ids, mask, settings)
        without = WITHOUT_SETTING.get(setting)
        other = torch_generate(torch_model, ids, mask, settings | without) if without else None
        reason = degenerate(expected, other, max_new, eos)
        if reason is None:
            return ids, mask, expected
        reasons.append(reason)
    raise AssertionError(f"{setting}: no input of seeds {first_seed}+{SEARCH_SEEDS} discriminates: {set(reasons)}")


def exact_log_softmax(logits: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis in float64: the exact values float32 kernels are held to (their own
    rounding depends on the CPU's SIMD, torch's and onnxruntime's alike)."""
    wide = logits.astype(np.float64)
    wide -= wide.max(axis=-1, keepdims=True)
    return wide - np.log(np.exp(wide).sum(axis=-1, keepdims=True))


def padded_batch(manifest, lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids of the export's vocabulary (graphs/manifest.py Manifest), one row per length, right-padded
    with its pad id. Ids start at 3 (where every family's tokenizer keeps its first specials); the
    manifest's pad, EOS and decoder-start ids are never drawn, wherever they are."""
    rng = np.random.default_rng(seed)
    vocab, special = manifest.dims.vocab_size, manifest.special_tokens
    specials = [special.pad_token_id, special.eos_token_id, special.decoder_start_token_id]
    allowed = np.setdiff1d(np.arange(3, vocab), specials)
    ids = np.full((len(lengths), max(lengths)), special.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        drawn = rng.integers(3, vocab, size=length)
        drawn_special = np.isin(drawn, specials)
        drawn[drawn_special] = allowed[drawn[drawn_special] % len(allowed)]  # the same draw for every family
        ids[row, :length] = drawn
        mask[row, :length] = 1
    return ids, mask


def tiny_model_params(trained: bool = False) -> list:
    """pytest params (family name, tiny kind) of every registered family's tiny models (graphs/families.py):
    the random ones, or those trained on a task. A family's first is in the default run, the rest `slow`."""
    from ortseq.exporter.families import FAMILIES

    params = []
    for family in FAMILIES:
        kinds = [kind for kind in family.tiny_builders() if (kind in family.trained_tiny_kinds) == trained]
        for index, kind in enumerate(kinds):
            marks = [pytest.mark.slow] if index else []
            params.append(pytest.param(family.name, kind, marks=marks, id=f"{family.name}-{kind}"))
    return params


def torch_generate(model, ids: np.ndarray, mask: np.ndarray, settings: dict) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **settings)
    return out.numpy()


def assert_disagreements_are_fp32_ties(ours, torch_model, batches, settings: dict, max_ties: int) -> None:
    """For each (ids, mask): our tokens equal transformers' fp32 tokens, or else its float64 tokens;
    and the float64 tie-breaks stay rare (at most max_ties)."""
    import copy

    torch64, disagreements = None, []
    for index, (ids, mask) in enumerate(batches):
        got = ours.generate(ids, mask, **settings)
        if np.array_equal(got, torch_generate(torch_model, ids, mask, settings)):
            continue
        torch64 = torch64 or copy.deepcopy(torch_model).double()
        disagreements.append(index)
        np.testing.assert_array_equal(got, torch_generate(torch64, ids, mask, settings), f"batch {index}")
    assert len(disagreements) <= max_ties, f"too many fp32 ties to be chance: batches {disagreements}"


CORPUS = [
    "The city council said the bridge will open next year.",
    "",
    "   ",
    "a  b\t\tc\n\nd   e",
    "  leading and trailing spaces  ",
    "café naïve Zürich São Paulo — €5, 100% «quoted» „text“",
    "Ünïcödé ÀÉÎÕÜ ß ﬁ ligature ＦＵＬＬＷＩＤＴＨ",
    "日本語のテキストと中文",
    "emoji 🙂🚀 and symbols ∑∫√",
    "tabs\tand\u00a0non-breaking\u2009spaces",
    "special-looking <pad> </s> <mask_1> <unk_5> tokens",
    "river " * 700,
    "x" * 3000,
]


def inline_shared_tables(export_dir: Path, target: Path) -> Path:
    """A copy of export_dir as exports made before embeddings.data were: each graph holds its own tables."""
    import onnx

    from ortseq.graphs import contract
    from ortseq.graphs.manifest import MANIFEST_FILE, sha256_of

    shutil.copytree(export_dir, target)
    graphs = (contract.ENCODER_FILE, contract.DECODER_FILE)
    for graph in graphs:
        onnx.save_model(onnx.load(str(target / graph)), str(target / graph))  # the tables back inline
    (target / contract.SHARED_WEIGHTS_FILE).unlink()
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    del manifest["files"][contract.SHARED_WEIGHTS_FILE]
    manifest["files"].update({graph: sha256_of(target / graph) for graph in graphs})
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return target


def readers_by_table(export_dir: Path) -> dict[str, set[tuple[str, int, str]]]:
    """For each initializer the graphs keep in the shared file: (op type, input position, that node's
    second input) of each node reading it, over both graphs."""
    import onnx

    from ortseq.graphs import contract

    readers: dict[str, set] = {}
    for graph in (contract.ENCODER_FILE, contract.DECODER_FILE):
        model = onnx.load(str(export_dir / graph), load_external_data=False)
        shared = {
            tensor.name
            for tensor in model.graph.initializer
            if {entry.key: entry.value for entry in tensor.external_data}.get("location")
            == contract.SHARED_WEIGHTS_FILE
        }
        for node in model.graph.node:
            for position, name in enumerate(node.input):
                if name in shared:
                    readers.setdefault(name, set()).add((node.op_type, position, node.input[1]))
    return readers


def rows_through_the_mapping(export_dir: Path, target: Path) -> Path:
    """A copy of export_dir whose manifest names no lookup tables (as manifests older than the field):
    the sessions read every table through the file's mapping."""
    from ortseq.graphs.manifest import MANIFEST_FILE

    shutil.copytree(export_dir, target)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest.pop("lookup_tables")
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return target


def wait_until(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def metric_value(metrics_text: str, series: str) -> float:
    """The value of one series in a /metrics page (Prometheus text format)."""
    return next(float(line.split()[-1]) for line in metrics_text.splitlines() if line.startswith(series + " "))
