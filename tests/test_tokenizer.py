"""The runtime tokenizer gives transformers' ids and decoded text (5.x tokenizers backend, and the
slow sentencepiece PegasusTokenizer of transformers 4.x run in its own environment)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CORPUS

from ortseq.graphs.manifest import Manifest
from ortseq.runtime.tokenizer import TextTokenizer

ROOT = Path(__file__).resolve().parent.parent
HF4_PYTHON = ROOT / ".venv-hf4" / "bin" / "python"


@pytest.fixture(scope="module")
def tiny(exported):
    model = exported("base")
    manifest = Manifest.read(model.export_dir)
    runtime = TextTokenizer(model.export_dir, manifest.tokenizer, manifest.special_tokens.pad_token_id)
    return model, runtime


def _ours(runtime: TextTokenizer, text: str, max_length: int = 10**6) -> list[int]:
    ids, mask = runtime.encode([text], max_length=max_length)
    return ids[0][mask[0] == 1].tolist()


def test_ids_and_text_match_transformers_tokenizer(tiny):
    from transformers import AutoTokenizer

    model, runtime = tiny
    reference = AutoTokenizer.from_pretrained(str(model.checkpoint))
    for text in CORPUS:
        ids = reference(text).input_ids
        assert _ours(runtime, text) == ids, text[:60]
        assert runtime.decode([ids]) == [reference.decode(ids, skip_special_tokens=True)], text[:60]


def test_truncation_matches_transformers(tiny, caplog):
    from transformers import AutoTokenizer

    model, runtime = tiny
    reference = AutoTokenizer.from_pretrained(str(model.checkpoint))
    text = "river bridge " * 400
    expected = reference(text, truncation=True).input_ids
    assert len(expected) == runtime.info.model_max_length
    assert _ours(runtime, text, runtime.info.model_max_length) == expected


def test_ids_and_text_match_slow_sentencepiece_tokenizer(tiny, tmp_path):
    """transformers 4.x's PegasusTokenizer (sentencepiece, 'slow') and its fast twin, run in .venv-hf4.

    transformers 4.x and 5.x differ from each other on surrounding whitespace only: 5.x encodes a
    leading/trailing whitespace run as a "▁" piece (4.x drops it) and keeps a trailing space when
    decoding (4.x strips it), and 4.x drops the space before a special-token string typed in the
    text ("a <pad>"). ortseq follows 5.x exactly (test above); against 4.x every other text must
    match once surrounding whitespace is set aside, whitespace runs inside a text included.
    """
    assert HF4_PYTHON.exists(), "run `make setup` to create .venv-hf4 (transformers 4.57 for this check)"
    model, runtime = tiny
    corpus = [text.strip() for text in CORPUS if "<" not in text]
    (tmp_path / "corpus.json").write_text(json.dumps(corpus))
    script = f"""
import json
from transformers import PegasusTokenizer, PegasusTokenizerFast
corpus = json.load(open({str(tmp_path / "corpus.json")!r}))
out = {{}}
for name, cls in (("slow", PegasusTokenizer), ("fast", PegasusTokenizerFast)):
    tok = cls(vocab_file={str(model.checkpoint / "spiece.model")!r})
    ids = [tok(text).input_ids for text in corpus]
    out[name] = {{"ids": ids, "text": [tok.decode(i, skip_special_tokens=True) for i in ids]}}
print(json.dumps(out))
"""
    result = subprocess.run([str(HF4_PYTHON), "-c", script], capture_output=True, text=True, check=True)
    reference = json.loads(result.stdout.strip().splitlines()[-1])
    for kind in ("slow", "fast"):
        for text, ids, decoded in zip(corpus, reference[kind]["ids"], reference[kind]["text"]):
            assert _ours(runtime, text) == ids, (kind, text[:60])
            assert runtime.decode([ids])[0].rstrip() == decoded.rstrip(), (kind, text[:60])


def test_the_tokenizer_is_read_on_first_use_not_at_load(exported):
    """A caller of generate(ids) never loads the tokenizers library (its peak stays the sessions'); the
    first text call reads the file."""
    export_dir = exported("base").export_dir
    probe = (
        "import sys, numpy as np\n"
        "from ortseq.runtime import Seq2SeqModel\n"
        f"model = Seq2SeqModel.load({str(export_dir)!r}, threads=1)\n"
        "model.generate(np.array([[5, 6, 7, 1]]), max_new_tokens=3)\n"
        "print('tokenizers' in sys.modules)\n"
        "model.summarize(['A text.'], max_new_tokens=3)\n"
        "print('tokenizers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]


def test_a_malformed_tokenizer_file_is_named_at_first_use_and_a_missing_one_at_load(exported, tmp_path):
    from ortseq.graphs.manifest import ManifestError
    from ortseq.runtime import Seq2SeqModel

    export_dir = tmp_path / "export"
    shutil.copytree(exported("base").export_dir, export_dir)
    tokenizer_file = export_dir / Manifest.read(export_dir).tokenizer.file
    tokenizer_file.write_text("{not json")
    model = Seq2SeqModel.load(export_dir, threads=1, verify=False)
    with pytest.raises(ManifestError, match="is not a tokenizer file tokenizers can read"):
        model.summarize(["A text."], max_new_tokens=3)
    tokenizer_file.unlink()
    with pytest.raises(ManifestError, match="is missing: the export has no tokenizer file"):
        Seq2SeqModel.load(export_dir, threads=1, verify=False)
