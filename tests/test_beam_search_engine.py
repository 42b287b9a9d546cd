"""`ortseq export --beam-search-op` and the "beam-search-op" engine: the loop's tokens, or a clear refusal."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import ortseq, padded_batch

from ortseq.exporter import beam_search_op
from ortseq.exporter.families import UnsupportedModelError, family_named
from ortseq.exporter.pipeline import export
from ortseq.exporter.verify import GraphMismatchError
from ortseq.graphs import families
from ortseq.graphs.contract import BEAM_SEARCH_FILE
from ortseq.graphs.manifest import Manifest, ManifestError, sha256_of
from ortseq.runtime import InvalidInputError, Seq2SeqModel

# On top of the model's defaults (4 beams, length penalty 0.6, max length 32, early_stopping False):
# beam search through the op needs early_stopping=True (see test_settings_the_graph_cannot_honour...).
SETTINGS = {
    "greedy_model_defaults": dict(num_beams=1),
    "greedy_min_new_tokens": dict(num_beams=1, max_new_tokens=20, min_new_tokens=6),
    "beam4_model_defaults_early_stopping": dict(early_stopping=True),
    "beam8_lp2": dict(num_beams=8, max_new_tokens=20, length_penalty=2.0, early_stopping=True),
    "beam4_return3": dict(num_beams=4, num_return_sequences=3, length_penalty=1.0, early_stopping=True),
    "beam4_min_new_tokens": dict(min_new_tokens=12, early_stopping=True),
}


def _checkpoint_with_generation(exported, tmp_path, **generation) -> str:
    """A copy of the base tiny checkpoint whose generation config says `generation`."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(exported("base").checkpoint, checkpoint)
    config_path = checkpoint / "generation_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | generation))
    return str(checkpoint)


def _engines(directory) -> tuple[Seq2SeqModel, Seq2SeqModel]:
    return Seq2SeqModel.load(directory, threads=1), Seq2SeqModel.load(directory, threads=1, engine="beam-search-op")


@pytest.fixture(scope="module")
def op_export(exported, tmp_path_factory):
    directory = tmp_path_factory.mktemp("beam_search_engine") / "export"
    export(str(exported("base").checkpoint), directory, beam_search_op=True)
    return directory


def test_export_lists_the_graph_and_the_engine_in_the_manifest(op_export):
    manifest = Manifest.read(op_export)
    assert manifest.engines == ["loop", "beam-search-op"]
    assert manifest.files[BEAM_SEARCH_FILE] == sha256_of(op_export / BEAM_SEARCH_FILE)


@pytest.mark.parametrize("name", SETTINGS)
def test_beam_search_op_engine_returns_the_loops_tokens(op_export, name):
    loop, op = _engines(op_export)
    finished_early = False
    for seed in range(3):
        ids, mask = padded_batch(loop.manifest, [40, 17, 29], seed=seed)
        expected = loop.generate(ids, mask, **SETTINGS[name])
        np.testing.assert_array_equal(op.generate(ids, mask, **SETTINGS[name]), expected)
        finished_early |= bool((expected[:, 1:-1] == loop.manifest.special_tokens.eos_token_id).any())
    assert finished_early, "some rows should end before the last column (so that the fill after EOS is checked)"


def test_model_defaults_with_early_stopping_and_ngram_ban_run_through_the_op(exported, tmp_path):
    directory = tmp_path / "export"
    checkpoint = _checkpoint_with_generation(exported, tmp_path, early_stopping=True, no_repeat_ngram_size=2)
    export(checkpoint, directory, beam_search_op=True)
    loop, op = _engines(directory)
    ids, mask = padded_batch(loop.manifest, [40, 17, 29], seed=5)
    ban_changed_tokens = False
    for settings in (dict(), dict(num_beams=8, num_return_sequences=3), dict(num_beams=1)):
        expected = loop.generate(ids, mask, **settings)
        np.testing.assert_array_equal(op.generate(ids, mask, **settings), expected)
        unbanned = loop.generate(ids, mask, **settings | {"no_repeat_ngram_size": 0})
        ban_changed_tokens |= unbanned.shape != expected.shape or bool((unbanned != expected).any())
    assert ban_changed_tokens, "the n-gram ban should matter in these searches"
    with pytest.raises(InvalidInputError, match="no_repeat_ngram_size=2"):
        op.generate(ids, mask, no_repeat_ngram_size=0)


def test_settings_the_graph_cannot_honour_are_refused(op_export):
    _, op = _engines(op_export)
    ids = np.array([[5, 6, 7]])
    for settings, message in [
        (dict(no_repeat_ngram_size=3, num_beams=1), "no_repeat_ngram_size=0"),
        (dict(), "only with early_stopping=True"),  # the model's defaults: 4 beams, no early stopping
        (dict(num_beams=2, early_stopping="never"), "only with early_stopping=True"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            op.generate(ids, **settings)
        with pytest.raises(InvalidInputError, match=message):  # before any tokenizing or search
            op.summarize(["a text"], **settings)


def test_cli_generate_with_the_op_engine_prints_the_loops_summaries(op_export):
    texts = "The council said the bridge will open.\nPolice closed the museum on Sunday.\n"
    for options in (("--num-beams", "1"), ("--num-beams", "8", "--length-penalty", "2", "--early-stopping")):
        loop = ortseq("generate", str(op_export), *options, stdin=texts)
        op = ortseq("generate", str(op_export), "--engine", "beam-search-op", *options, stdin=texts)
        assert loop.returncode == 0 and op.returncode == 0, (loop.stderr, op.stderr)
        assert op.stdout == loop.stdout and len(op.stdout.splitlines()) == 2


def test_cli_refuses_what_the_op_engine_cannot_do_with_exit_2(exported, op_export):
    cases = [
        ((str(op_export), "--num-beams", "1", "--no-repeat-ngram-size", "2"), "no_repeat_ngram_size"),
        ((str(op_export),), "only with early_stopping=True"),
        ((str(exported("base").export_dir),), "export with `ortseq export SOURCE --out DIR --beam-search-op`"),
    ]
    for args, message in cases:
        result = ortseq("generate", *args, "--engine", "beam-search-op", "a text")
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_export_refuses_families_the_graph_is_not_built_for():
    without_op = [entry.name for entry in families.REGISTRY if not entry.beam_search_op]
    assert without_op
    for name in without_op:
        with pytest.raises(UnsupportedModelError, match="export without --beam-search-op"):
            beam_search_op.check_supported(family_named(name))


def test_a_manifest_listing_the_op_engine_for_a_family_without_it_is_refused(op_export):
    """The registry's beam_search_op fact, read by the runtime's manifest check."""
    manifest = Manifest.read(op_export)
    manifest.check()
    for entry in families.REGISTRY:
        manifest.family = entry.name
        if entry.beam_search_op:
            manifest.check()
        else:
            with pytest.raises(ManifestError, match=f"which {entry.name} exports never carry"):
                manifest.check()


def test_export_fails_when_the_graph_disagrees_with_the_loop(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(beam_search_op, "_forced_eos", lambda logits, *_: logits)  # a graph without forced EOS
    with pytest.raises(GraphMismatchError, match="tokens differ"):
        export(str(exported("base").checkpoint), tmp_path / "out", beam_search_op=True)
    assert list(tmp_path.iterdir()) == []
