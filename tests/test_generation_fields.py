"""Every generation_config field that changes greedy or beam-search tokens is honoured exactly as
transformers 5.x's generate() applies it (as the model's default and per call), or refused by name."""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from dataclasses import asdict

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ortseq.exporter.families import UnsupportedModelError
from ortseq.exporter.pipeline import export, generation_defaults
from ortseq.graphs.manifest import Manifest
from ortseq.runtime import Seq2SeqModel, cli
from ortseq.runtime.errors import InvalidInputError
from ortseq.runtime.serving.app import create_app
from ortseq.runtime.serving.schema import RequestLimits
from tests.helpers import degenerate, padded_batch, torch_generate
from tests.test_serving import wait_until_ready

BEAMS = [1, 2, 4]
NEW_TOKENS = 12
EOS = 1


@pytest.fixture(scope="module")
def base(exported):
    """The base tiny Pegasus (generation config: 4 beams, max_length 32, forced EOS), a padded batch
    on which every field's case discriminates with greedy, 2- and 4-beam search (helpers.degenerate;
    lengths and seed chosen for that), and the tokens transformers generates for it without any extra field."""
    model = exported("base")
    ours = Seq2SeqModel.load(model.export_dir)
    ids, mask = padded_batch(ours.manifest, [40, 17, 5, 9, 3, 30], seed=0)
    plains = {
        b: torch_generate(model.torch_model, ids, mask, dict(num_beams=b, max_new_tokens=NEW_TOKENS)) for b in BEAMS
    }
    return model, ours, ids, mask, plains


def field_values(plains: dict[int, np.ndarray]) -> dict:
    """A value for every honoured field that changes the plain tokens of these inputs."""
    generated = Counter(int(t) for out in plains.values() for t in out[:, 1:].ravel() if t > EOS)
    frequent = [token for token, _ in generated.most_common(3)]
    first = sorted({int(out[row, 1]) for out in plains.values() for row in range(out.shape[0])})
    bigrams = sorted(
        {tuple(int(t) for t in out[row, i : i + 2]) for out in plains.values() for row in range(3) for i in (1, 2)}
    )
    return {
        "forced_bos_token_id": 120,
        "repetition_penalty": 1.3,
        "encoder_repetition_penalty": 3.0,
        "encoder_no_repeat_ngram_size": 1,  # 2 bans nothing here: the outputs share no bigram with the inputs
        "bad_words_ids": [list(pair) for pair in bigrams if EOS not in pair] + [[frequent[0]]],
        "suppress_tokens": frequent,
        "begin_suppress_tokens": first,
        "min_new_tokens": 7,
        "min_length": 8,
    }


HONOURED = [
    "forced_bos_token_id",
    "repetition_penalty",
    "encoder_repetition_penalty",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "min_new_tokens",
    "min_length",
]


def assert_changed_and_not_degenerate(got: np.ndarray, plain: np.ndarray, name: str) -> None:
    """The field changes the tokens, and they end at varied lengths, not all at step 1 or the maximum."""
    reason = degenerate(got, plain, NEW_TOKENS, EOS)
    assert reason is None, f"{name}: {reason}: {got.tolist()}"


@pytest.mark.parametrize("beams", BEAMS)
@pytest.mark.parametrize("name", HONOURED)
def test_generation_field_per_call_matches_transformers_on_padded_batch(base, name, beams):
    model, ours, ids, mask, plains = base
    settings = dict(num_beams=beams, max_new_tokens=NEW_TOKENS, **{name: field_values(plains)[name]})
    expected = torch_generate(model.torch_model, ids, mask, settings)
    np.testing.assert_array_equal(ours.generate(ids, mask, **settings), expected)
    assert_changed_and_not_degenerate(expected, plains[beams], name)


@pytest.mark.parametrize("beams", BEAMS)
@pytest.mark.parametrize("name", HONOURED)
def test_generation_field_as_model_default_matches_transformers(base, tmp_path, name, beams):
    """The field set in the checkpoint's generation config: the exporter's reading of it (what export
    writes to the manifest) gives transformers' tokens for the model's own default."""
    model, ours, ids, mask, plains = base
    value = field_values(plains)[name]
    torch_model = copy.copy(model.torch_model)  # shares the weights; its own generation config
    torch_model.generation_config = copy.deepcopy(model.torch_model.generation_config)
    setattr(torch_model.generation_config, name, value)
    with_default = _export_copy_with_generation_config(model.export_dir, tmp_path, torch_model)
    settings = dict(num_beams=beams, max_new_tokens=NEW_TOKENS)
    expected = torch_generate(torch_model, ids, mask, settings)
    np.testing.assert_array_equal(with_default.generate(ids, mask, **settings), expected)
    assert_changed_and_not_degenerate(expected, plains[beams], name)


def _export_copy_with_generation_config(export_dir, tmp_path, torch_model) -> Seq2SeqModel:
    """The export's graphs with the manifest that export writes for torch_model's generation config."""
    copied = tmp_path / "export"
    shutil.copytree(export_dir, copied)
    manifest = Manifest.read(copied)
    manifest.generation, manifest.ignored_generation_fields = generation_defaults(torch_model)
    manifest.write(copied)
    return Seq2SeqModel.load(copied)


@pytest.fixture(scope="module")
def configured(base, tmp_path_factory):
    """A checkpoint whose generation_config.json sets several honoured fields, do_sample=True (refused)
    and no max_length, exported with --ignore-generation-fields."""
    model, ours, ids, mask, plains = base
    root = tmp_path_factory.mktemp("configured")
    checkpoint = root / "checkpoint"
    shutil.copytree(model.checkpoint, checkpoint)
    config_file = checkpoint / "generation_config.json"
    config = json.loads(config_file.read_text())
    config.pop("max_length")
    values = field_values(plains)
    config |= {name: values[name] for name in ("forced_bos_token_id", "repetition_penalty", "bad_words_ids")}
    config |= {"encoder_no_repeat_ngram_size": 2, "do_sample": True}
    config_file.write_text(json.dumps(config))
    export(str(checkpoint), root / "export", ignore_generation_fields=True)
    from transformers import PegasusForConditionalGeneration

    torch_model = PegasusForConditionalGeneration.from_pretrained(str(checkpoint)).eval()
    return torch_model, Seq2SeqModel.load(root / "export"), checkpoint


@pytest.mark.parametrize("beams", BEAMS)
def test_fields_set_in_generation_config_json_are_exported_and_honoured(base, configured, beams):
    _, _, ids, mask, plains = base
    torch_model, ours, _ = configured
    settings = dict(num_beams=beams, max_new_tokens=NEW_TOKENS)
    expected = torch_generate(torch_model, ids, mask, settings | {"do_sample": False})
    np.testing.assert_array_equal(ours.generate(ids, mask, **settings), expected)
    assert_changed_and_not_degenerate(expected, plains[beams], "the configured fields")


def test_ignore_generation_fields_records_what_is_ignored(configured):
    _, ours, _ = configured
    assert ours.manifest.ignored_generation_fields == {"do_sample": True}
    assert ours.manifest.generation.max_length is None  # left unset, not recorded as 20


@pytest.mark.parametrize("beams", [1, 4])
def test_unset_max_length_generates_transformers_default_of_20_new_tokens(base, configured, beams):
    _, _, ids, mask, _ = base
    torch_model, ours, _ = configured
    settings = dict(num_beams=beams, min_new_tokens=20)  # no row ends early: the length limit decides
    expected = torch_generate(torch_model, ids, mask, settings | {"do_sample": False})
    got = ours.generate(ids, mask, **settings)
    assert expected.shape[1] == 21
    np.testing.assert_array_equal(got, expected)


def test_export_refuses_do_sample_by_name(base, tmp_path):
    model = base[0]
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(model.checkpoint, checkpoint)
    config_file = checkpoint / "generation_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"do_sample": True, "top_k": 5}))
    with pytest.raises(UnsupportedModelError, match="do_sample=True.*--ignore-generation-fields"):
        export(str(checkpoint), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_exits_2_naming_the_refused_field(base, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(base[0].checkpoint, checkpoint)
    config_file = checkpoint / "generation_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"sequence_bias": [[[5], 1.0]]}))
    assert cli.main(["export", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ortseq: error")]
    assert len(error) == 1 and "sequence_bias" in error[0]


def test_cli_generate_takes_the_new_fields(base, capsys):
    _, ours, _, _, plains = base
    values = field_values(plains)
    flags = ["--repetition-penalty", "2.5", "--suppress-tokens", ",".join(map(str, values["suppress_tokens"]))]
    flags += ["--bad-words-ids", json.dumps(values["bad_words_ids"]), "--forced-bos-token-id", "120"]
    flags += ["--encoder-no-repeat-ngram-size", "2", "--num-beams", "2", "--max-new-tokens", "8"]
    assert cli.main(["generate", str(ours.directory), "a text about the river", *flags]) == 0
    expected = ours.summarize(
        ["a text about the river"],
        repetition_penalty=2.5,
        suppress_tokens=values["suppress_tokens"],
        bad_words_ids=values["bad_words_ids"],
        forced_bos_token_id=120,
        encoder_no_repeat_ngram_size=2,
        num_beams=2,
        max_new_tokens=8,
    )
    assert capsys.readouterr().out.splitlines() == [s.replace("\n", " ") for s in expected]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--repetition-penalty", "0"], "repetition_penalty"),
        (["--suppress-tokens", "5,100000"], "suppress_tokens"),
        (["--forced-bos-token-id", "-3"], "forced_bos_token_id"),
        (["--bad-words-ids", "[5, 6]"], "bad_words_ids"),
    ],
)
def test_cli_generate_refuses_bad_field_values_with_exit_2(base, capsys, flags, named):
    assert cli.main(["generate", str(base[1].directory), "a text", *flags]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and named in error[0]


def test_cli_generate_refuses_unparsable_token_lists(base):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", str(base[1].directory), "a text", "--bad-words-ids", "not json"])
    assert exit_info.value.code == 2


def test_http_takes_the_new_fields_and_refuses_bad_values(base):
    _, ours, _, _, plains = base
    values = field_values(plains)
    parameters = {name: values[name] for name in ("bad_words_ids", "suppress_tokens", "forced_bos_token_id")}
    parameters |= {"repetition_penalty": 1.3, "encoder_no_repeat_ngram_size": 2, "max_new_tokens": 8}
    with TestClient(create_app(ours, RequestLimits(max_inputs=4))) as client:
        wait_until_ready(lambda: client.get("/readyz").status_code)
        response = client.post("/v1/summarize", json={"inputs": ["a text about the river"], "parameters": parameters})
        assert response.status_code == 200, response.text
        assert response.json()["summaries"] == ours.summarize(["a text about the river"], **parameters)
        for bad in [{"repetition_penalty": -1.0}, {"bad_words_ids": "5"}, {"suppress_tokens": [10**6]}]:
            response = client.post("/v1/summarize", json={"inputs": ["a text"], "parameters": bad})
            assert response.status_code == 422 and next(iter(bad)) in json.dumps(response.json()["error"])


def test_forcing_a_suppressed_token_is_refused_like_transformers(base):
    with pytest.raises(InvalidInputError, match="forced_eos_token_id"):
        base[1].generate(base[2], base[3], suppress_tokens=[EOS])  # the model forces EOS last


def test_beam_search_op_engine_refuses_new_fields_by_name(base):
    """The op's graph has no input for them (runtime/beam_search_op.py's OP_UNSUPPORTED)."""
    from ortseq.runtime.beam_search_op import BeamSearchOpModel

    engine = BeamSearchOpModel.__new__(BeamSearchOpModel)
    engine.no_repeat_ngram_size, engine.early_stopping, engine.forced_eos_token_id = 0, True, EOS
    settings = base[1].settings(num_beams=1)
    engine.check(settings)
    with pytest.raises(InvalidInputError, match="repetition_penalty"):
        engine.check(base[1].settings(num_beams=1, repetition_penalty=1.2))


def test_old_manifests_with_seven_generation_fields_still_load(base, tmp_path):
    copied = tmp_path / "export"
    shutil.copytree(base[1].directory, copied)
    raw = json.loads((copied / "manifest.json").read_text())
    seven = ("num_beams", "max_length", "min_length", "length_penalty", "no_repeat_ngram_size", "early_stopping")
    raw["generation"] = {name: raw["generation"][name] for name in (*seven, "forced_eos_token_id")}
    raw["schema_version"] = 1
    raw.pop("ignored_generation_fields")
    (copied / "manifest.json").write_text(json.dumps(raw))
    manifest = Manifest.read(copied)
    assert asdict(manifest.generation)["repetition_penalty"] == 1.0 and manifest.generation.max_length == 32
