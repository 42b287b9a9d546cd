"""LSG-Pegasus: our op against its numpy spec, and our exports against the reference code's goldens.

The goldens (tests/fixtures/lsg, made by `make lsg-golden` in the reference's own pinned
environment) hold encoder states, decoder logits, greedy and beam tokens at lengths 1 to 1024 on
padded batches, for every sparsity type and the global-token options; LSH runs record the random
hyperplanes the reference drew, and we feed the same ones to our graph.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ortseq.exporter.families.lsg_pegasus import lsh_planes_name
from ortseq.exporter.lsg_attention import LSGAttentionCore
from ortseq.exporter.pipeline import export
from ortseq.exporter.tiny.pegasus import pegasus_tokenizer_from_spiece, train_pegasus_sentencepiece
from ortseq.graphs import contract
from ortseq.graphs.lsg import LSGSettings, lsg_attention_reference
from ortseq.runtime import Seq2SeqModel

FIXTURES = Path(__file__).parent / "fixtures" / "lsg"
VARIANTS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
# fp32 rounding, measured against a float64 run of the same model on these fixtures: the reference's
# own fp32 outputs are off by up to 1.1e-5 (hidden states) and 1.4e-4 (logits: pooling, L=100, row 1,
# step 3), ours by up to 1.0e-5 and 1.9e-4 at that same spot, in the other direction (the strong
# random weights amplify rounding). Two correct fp32 implementations can differ by the sum.
# A wrong window, mask or selection moves them by 0.1 to 1, and the tokens are compared exactly.
HIDDEN_ATOL = 5e-5
LOGITS_ATOL = 5e-4
SPARSITY_TYPES = ["none", "norm", "pooling", "lsh", "stride", "block_stride", "bos_pooling"]


# (block_size, sparse_block_size, sparsity_factor): equal blocks, and two geometries where confusing one
# size for the other (or for block_size / sparsity_factor) moves the windows
GEOMETRIES = [(8, 8, 2), (8, 4, 4), (4, 8, 2)]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "b{}_s{}_f{}".format(*g))
@pytest.mark.parametrize("sparsity_type", SPARSITY_TYPES)
@pytest.mark.parametrize("globals_", [1, 3])
def test_torch_op_matches_numpy_reference(sparsity_type, globals_, geometry):
    """The vectorised, traced implementation against the block-by-block spec in graphs/lsg.py."""
    rng = np.random.default_rng(len(sparsity_type) * 10 + globals_)
    settings = LSGSettings(*geometry, sparsity_type, globals_, lsh_num_pre_rounds=2)
    n, heads, dh = 2, 4, 6
    for t in (16, 24, 64):  # 2 blocks of 8 (the short-input path), 3, and 8
        q, k, v = (2 * rng.standard_normal((n, heads, globals_ + t, dh), dtype=np.float32) for _ in range(3))
        keep = np.ones((n, t), np.float32)
        keep[1, t - 7 :] = 0
        planes = rng.standard_normal(sum(np.prod(s) for s in settings.lsh_plane_shapes(heads, dh)), dtype=np.float32)
        want = lsg_attention_reference(q, k, v, keep, planes, settings)
        with torch.no_grad():
            got = LSGAttentionCore(settings)(*(torch.from_numpy(a) for a in (q, k, v, keep, planes))).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=f"T={t}")


class Golden:
    def __init__(self, name: str):
        self.name = name
        self.arrays = np.load(FIXTURES / name / "goldens.npz")
        self.meta = json.loads((FIXTURES / name / "goldens.json").read_text())
        self.lengths = [entry["L"] for entry in self.meta["lengths"].values()]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def lsh_planes(self, length: int, layer: int) -> np.ndarray | None:
        keys = sorted(k for k in self.arrays.files if k.startswith(f"lsh_planes__L{length}__layer{layer}__"))
        return np.concatenate([self.arrays[k].ravel() for k in keys]) if keys else None


@pytest.fixture(scope="session")
def lsg_exported(tmp_path_factory):
    """lsg_exported(variant) -> export dir of that golden checkpoint (a tokenizer added: fixtures have none)."""
    root = tmp_path_factory.mktemp("lsg")
    spiece = train_pegasus_sentencepiece(root / "_spm", vocab_size=90)
    tokenizer = pegasus_tokenizer_from_spiece(spiece, 1024)
    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            checkpoint = root / variant / "checkpoint"
            shutil.copytree(FIXTURES / variant, checkpoint)
            tokenizer.save_pretrained(checkpoint)
            export(str(checkpoint), root / variant / "export")
            cache[variant] = root / variant / "export"
        return cache[variant]

    return get


def export_with_golden_planes(export_dir: Path, golden: Golden, length: int, out: Path) -> Path:
    """A copy of export_dir whose encoder uses the hyperplanes the reference drew at this length."""
    model = onnx.load(str(export_dir / contract.ENCODER_FILE))
    for init in model.graph.initializer:
        for layer in range(golden.meta["config"]["encoder_layers"]):
            if init.name == lsh_planes_name(layer):
                init.CopyFrom(onnx.numpy_helper.from_array(golden.lsh_planes(length, layer), init.name))
    shutil.copytree(export_dir, out, dirs_exist_ok=True)
    onnx.save(model, str(out / contract.ENCODER_FILE))
    return out


def _models_per_length(export_dir: Path, golden: Golden, tmp_path: Path):
    for length in golden.lengths:
        directory = export_dir
        if golden.lsh_planes(length, 0) is not None:
            directory = export_with_golden_planes(export_dir, golden, length, tmp_path / f"L{length}")
        yield length, Seq2SeqModel.load(directory, verify=directory == export_dir)


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_matches_reference_goldens(lsg_exported, variant, tmp_path):
    """Encoder states, decoder logits, greedy and beam tokens at every golden length, padded batches."""
    golden = Golden(variant)
    for length, model in _models_per_length(lsg_exported(variant), golden, tmp_path):
        key = f"L{length}"
        ids, mask = golden[f"input_ids__{key}"], golden[f"attention_mask__{key}"]
        hidden, memory_mask = model.sessions.run_encoder(["last_hidden_state", "encoder_attention_mask"], ids, mask)
        np.testing.assert_allclose(
            hidden, golden[f"encoder_last_hidden_state__{key}"], rtol=0, atol=HIDDEN_ATOL, err_msg=key
        )
        logits = model.sessions.teacher_forced_logits(ids, mask, golden[f"decoder_input_ids__{key}"])
        np.testing.assert_allclose(logits, golden[f"logits__{key}"], rtol=0, atol=LOGITS_ATOL, err_msg=key)
        settings = golden.meta["generate_kwargs"]
        for mode in ("greedy", "beam"):
            kwargs = {k: settings[mode][k] for k in ("num_beams", "max_new_tokens", "length_penalty", "early_stopping")}
            np.testing.assert_array_equal(
                model.generate(ids, mask, **kwargs), golden[f"{mode}__{key}"], f"{mode} {key}"
            )


def test_attention_memory_is_linear_in_length():
    """No tensor the op makes grows like T^2: the biggest is the per-block score tensor, T x (G + 2S + 3B)."""
    from torch.overrides import TorchFunctionMode

    class LargestTensor(TorchFunctionMode):
        largest = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                LargestTensor.largest = max(LargestTensor.largest, out.numel())
            return out

    settings = LSGSettings(32, 32, 2, "norm", 1, 1)
    keys_per_block = 1 + 2 * 32 + 3 * 32
    for t in (1024, 4096):
        q, k, v = (torch.randn(1, 1, 1 + t, 4) for _ in range(3))
        LargestTensor.largest = 0
        with torch.no_grad(), LargestTensor():
            LSGAttentionCore(settings)(q, k, v, torch.ones(1, t), torch.zeros(0))
        assert LargestTensor.largest <= t * keys_per_block, (t, LargestTensor.largest)


def test_tiny_lsg_pegasus_summarizes_long_text(tmp_path):
    """`ortseq export tiny-lsg-pegasus` (built offline) serves texts far longer than 2 blocks, in a padded batch,
    with the tokens of the torch path it was exported from."""
    from ortseq.exporter.tiny.lsg_pegasus import build_tiny_lsg_pegasus

    checkpoint = build_tiny_lsg_pegasus(tmp_path / "checkpoint")
    assert json.loads((checkpoint / "config.json").read_text())["sparsity_type"] == "norm"
    export(str(checkpoint), tmp_path / "export")
    model = Seq2SeqModel.load(tmp_path / "export")
    assert model.manifest.family == "lsg_pegasus"
    texts = ["The river bridge will open next year. " * 60, "The museum was closed."]
    ids, mask = model.tokenizer.encode(texts)
    assert ids.shape[1] > 3 * 32
    memory = model.sessions.encode(ids, mask)
    assert memory["encoder_attention_mask"].shape == (2, 1 + ids.shape[1])  # the global token is prepended
    got = model.generate(ids, mask, num_beams=2, max_new_tokens=8)
    np.testing.assert_array_equal(got, torch_lsg_generate(checkpoint, ids, mask, num_beams=2, max_new_tokens=8))
    assert len({int(np.argmax(row[1:] == 1)) for row in got}) == 2  # the rows end at different steps
    assert model.summarize(texts, num_beams=2, max_new_tokens=8) == model.tokenizer.decode(got)


def torch_lsg_generate(checkpoint: Path, ids: np.ndarray, mask: np.ndarray, **settings) -> np.ndarray:
    """transformers' generate() on the states of the torch LSG encoder the export traced (its op is checked
    against the numpy spec above, and the export against the reference's goldens): the fp32 path in torch."""
    from transformers.modeling_outputs import BaseModelOutput

    from ortseq.exporter.families.lsg_pegasus import LSGPegasusFamily

    family = LSGPegasusFamily()
    encoder = family.encoder_export(family.load_model(str(checkpoint)))
    with torch.no_grad():
        memory, memory_mask, *_ = encoder(torch.from_numpy(ids), torch.from_numpy(mask))
        out = family.reference_model(str(checkpoint)).generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory), attention_mask=memory_mask, **settings
        )
    return out.numpy()
