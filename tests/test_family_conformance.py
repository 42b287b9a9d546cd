"""What every registered family (graphs/families.py) must do, checked on each of its tiny models: it exports,
its tokenizer round-trips as transformers', its fp32 tokens are transformers' (greedy, beams, a padded batch,
the checkpoint's generation fields), its checkpoint laid out as pytorch_model.bin or sharded safetensors exports
the same tokens, it quantizes with a real gate where a trained tiny model exists, and it
bundles. A new family is covered by registering it (docs/adding-a-family.md).

The cases come from helpers.tiny_model_params: each family's first tiny model in the default run, its others
`slow`; so are the bundle, the trained models' quantization and the searches beyond greedy and the
checkpoint's own. The exports are conftest's session exports (`tiny_export`), shared with test_quantize_families.py.
Family-specific depth stays in each family's own tests (test_bart.py, test_lsg.py, test_encoder_decoder.py...).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers import (
    CORPUS,
    SETTINGS,
    WITHOUT_SETTING,
    degenerate,
    discriminating_batch,
    padded_batch,
    tiny_model_params,
    torch_generate,
)
from test_bundle import summarize

from ortseq.exporter.families import family_named
from ortseq.exporter.quantization.pipeline import DEFAULT_MIN_AGREEMENT, quantize
from ortseq.exporter.quantization.quality import default_texts, lowest_agreement
from ortseq.graphs.manifest import Manifest
from ortseq.runtime import Seq2SeqModel
from ortseq.runtime.bundle import make_bundle

CASES = tiny_model_params()
# Searches of helpers.SETTINGS every family must match: greedy, beams, per-call generation fields, and the
# checkpoint's own generation config (its fields: forced BOS/EOS, bad words, length penalty, ...), with room
# for the tiny models' hypotheses to end at varied steps (each case asserts that they do)
# (not min_new_tokens: the conformance models' greedy rows never end before the maximum, so no batch can show
# it deciding anything; it is checked where one does, Pegasus' greedy_min_new_tokens and encoder-decoder's
# beam2_min_new_tokens parity cases)
PARITY_NAMES = ["greedy", "beam4_lp06", "beam4_no_repeat_3", "beam4_return4", "model_defaults"]
PARITY_SETTINGS = {
    name: {**SETTINGS[name], "max_new_tokens": 40} if "max_new_tokens" in SETTINGS[name] else SETTINGS[name]
    for name in PARITY_NAMES
}
# In the default run: greedy and the checkpoint's own search (its generation fields); the other searches
# (about 15 s a family each) are `slow`, and each family's own tests search more widely
DEFAULT_RUN_SETTINGS = ("greedy", "model_defaults")
# Words of real text in each row of a candidate batch: padded rows of varied lengths
ROW_WORDS = [36, 17, 6, 2]
CANDIDATES = 6  # batches of real text, and as many of random ids, tried in turn
TEXTS = ["The city council said the new river bridge will open next year.", "Police closed the museum on Sunday."]


@pytest.fixture(scope="module")
def reference(tiny_export):
    """reference(kind) -> transformers' own model of the tiny checkpoint (Family.reference_model), loaded once."""
    cache = {}

    def get(family: str, kind: str):
        if kind not in cache:
            cache[kind] = family_named(family).reference_model(str(tiny_export(kind).checkpoint))
        return cache[kind]

    return get


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_exports_a_manifest_of_its_family_whose_files_verify(tiny_export, family, kind):
    export_dir = tiny_export(kind).export_dir
    manifest = Manifest.read(export_dir)
    assert manifest.family == family and manifest.precision == "fp32"
    manifest.verify_files(export_dir)


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_the_runtime_tokenizer_round_trips_as_transformers(tiny_export, family, kind):
    from transformers import AutoTokenizer

    exported = tiny_export(kind)
    reference_tokenizer = AutoTokenizer.from_pretrained(str(exported.checkpoint))
    ours = Seq2SeqModel.load(exported.export_dir).tokenizer
    add_special_tokens = ours.info.add_special_tokens
    # typed special tokens and runs of spaces are family details (test_tokenizer*.py): here, every text else
    for text in (text.strip() for text in CORPUS if "<" not in text and text.strip()):
        expected = reference_tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        assert ours.token_ids([text])[0] == expected, text[:60]
        assert ours.decode([expected]) == [reference_tokenizer.decode(expected, skip_special_tokens=True)], text[:60]


def candidate_batches(ours: Seq2SeqModel):
    """Padded batches of rows of varied lengths, real text first, then random ids (helpers.padded_batch)."""
    manifest = ours.manifest
    longest = min(manifest.dims.max_position_embeddings, 48)
    words = " ".join(default_texts()).split()
    for start in range(0, 4 * CANDIDATES, 4):
        rows = [" ".join(words[start + offset : start + offset + count]) for offset, count in enumerate(ROW_WORDS)]
        yield ours.tokenizer.encode(rows, max_length=longest)
        yield padded_batch(manifest, [longest, 17, 5, 1], seed=start)


@pytest.mark.parametrize(
    "setting",
    [pytest.param(name, marks=[] if name in DEFAULT_RUN_SETTINGS else [pytest.mark.slow]) for name in PARITY_SETTINGS],
)
@pytest.mark.parametrize(("family", "kind"), CASES)
def test_generate_matches_transformers_on_a_padded_batch(tiny_export, reference, family, kind, setting):
    """On the first candidate batch where the case discriminates (helpers.degenerate: rows end at varied
    steps, some before the maximum, and the tokens differ from the same case without its setting),
    ortseq's tokens are transformers'."""
    if not family_named(family).reference_encoder:
        pytest.skip(f"transformers has no {family} encoder: its parity rests on the reference code's goldens")
    ours = Seq2SeqModel.load(tiny_export(kind).export_dir)
    settings, eos = PARITY_SETTINGS[setting], ours.manifest.special_tokens.eos_token_id
    torch_model, without = reference(family, kind), WITHOUT_SETTING.get(setting)
    max_new = settings.get("max_new_tokens", torch_model.generation_config.max_length - 1)
    reasons = set()
    for ids, mask in candidate_batches(ours):
        expected = torch_generate(torch_model, ids, mask, settings)
        other = torch_generate(torch_model, ids, mask, settings | without) if without else None
        reason = degenerate(expected, other, max_new, eos)
        if reason is None:
            np.testing.assert_array_equal(ours.generate(ids, mask, **settings), expected)
            return
        reasons.add(reason)
    pytest.fail(f"{setting}: none of {2 * CANDIDATES} batches discriminates: {reasons}")


@pytest.mark.parametrize("setting", DEFAULT_RUN_SETTINGS)
@pytest.mark.parametrize(("family", "kind"), CASES)
def test_generate_matches_transformers_on_an_unpadded_batch(tiny_export, reference, family, kind, setting):
    """Rows of one length: the encoder runs without its mask (exporter/unpadded_attention.py), the other
    branch from the padded batches above, which short inputs share an encoder run in (runtime/sessions.py)."""
    if not family_named(family).reference_encoder:
        pytest.skip(f"transformers has no {family} encoder: its parity rests on the reference code's goldens")
    ours = Seq2SeqModel.load(tiny_export(kind).export_dir)
    longest = min(ours.manifest.dims.max_position_embeddings, 48)
    ids, mask, expected = discriminating_batch(
        reference(family, kind),
        setting,
        lambda seed: padded_batch(ours.manifest, [longest] * 3, seed=seed),
        first_seed=0,
        eos=ours.manifest.special_tokens.eos_token_id,
        settings=PARITY_SETTINGS[setting],
    )
    assert mask.all()
    np.testing.assert_array_equal(ours.generate(ids, mask, **PARITY_SETTINGS[setting]), expected)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "kind"), tiny_model_params(trained=True))
def test_a_trained_tiny_model_quantizes_through_the_real_gate(tiny_export, tmp_path, family, kind):
    """int8 with the default threshold: a model that has learned a task keeps its tokens."""
    manifest = quantize(tiny_export(kind).export_dir, tmp_path / "int8", "int8")
    assert manifest.family == family and manifest.precision == "int8"
    _, agreement = lowest_agreement(manifest.quantization.quality)
    assert agreement >= DEFAULT_MIN_AGREEMENT


@pytest.mark.slow
@pytest.mark.parametrize(("family", "kind"), CASES)
def test_bundles_and_the_bundle_summarizes_as_the_export(tiny_export, tmp_path, family, kind):
    export_dir = tiny_export(kind).export_dir
    bundle = make_bundle(export_dir, tmp_path / "bundle")
    result = summarize(sys.executable, bundle, *TEXTS, "--num-beams", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == Seq2SeqModel.load(export_dir).summarize(TEXTS, num_beams=2)


def _relaid(checkpoint, out, layout: str):
    """The tiny checkpoint's files laid out again as save_pretrained writes its other layouts: the same
    tensors, under the same names, in pytorch_model.bin (torch's zip format) or in two safetensors shards
    with their index."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, out, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(str(checkpoint / "model.safetensors"))
    if layout == "pytorch_model.bin":
        torch.save(tensors, out / "pytorch_model.bin")
        return out
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({name: tensors[name] for name in part}, str(out / file), metadata={"format": "pt"})
    weight_map = {name: file for file, part in halves.items() for name in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded-safetensors"])
@pytest.mark.parametrize(("family", "kind"), CASES)
def test_the_checkpoint_in_another_file_layout_exports_the_same_tokens(tiny_export, tmp_path, family, kind, layout):
    """Every registered family reads each file layout save_pretrained writes: the same tensors laid out again
    give an export whose tokens on a padded batch are the first export's (itself checked against
    transformers; the checkpoint zoo checks the layouts against transformers 4.x's own files and tokens)."""
    from ortseq.exporter.pipeline import export

    first = tiny_export(kind)
    relaid = _relaid(first.checkpoint, tmp_path / "checkpoint", layout)
    assert not (relaid / "model.safetensors").exists()
    export(str(relaid), tmp_path / "export")
    ours, again = Seq2SeqModel.load(first.export_dir), Seq2SeqModel.load(tmp_path / "export")
    ids, mask = next(iter(candidate_batches(ours)))
    for settings in ({"num_beams": 1, "max_new_tokens": 20}, {"num_beams": 4, "max_new_tokens": 20}):
        np.testing.assert_array_equal(again.generate(ids, mask, **settings), ours.generate(ids, mask, **settings))
