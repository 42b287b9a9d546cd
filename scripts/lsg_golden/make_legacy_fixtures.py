#!/usr/bin/env python
"""Untied LSG-Pegasus checkpoints written by transformers 4.47.1 with lsg-converter's remote code, with
that code's own generate() goldens (tests/fixtures/legacy/lsg_pegasus_untied_*, `make legacy-golden`).

Runs in the pinned reference venv (.venv-lsg-ref, see setup_env.sh):
    .venv-lsg-ref/bin/python scripts/lsg_golden/make_legacy_fixtures.py TOKENIZERS OUT
TOKENIZERS is the folder scripts/legacy_golden/tokenizer_files.py wrote. The model is built by the
reference module (make_goldens.py's loader and strong init), untied (tie_word_embeddings=False: 4.x
stores model.shared once and a separate lm_head), saved with the modeling file as a remote-code
checkpoint, reloaded through AutoModelForSeq2SeqLM(trust_remote_code=True), and its goldens written by
scripts/legacy_golden/make_fixtures.py's write_goldens (greedy, 4 beams, the defaults, one case per
generation field that changes the tokens). LSH is left out: its hyperplanes are redrawn on every call.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "legacy_golden")]

import make_fixtures as legacy  # noqa: E402
import make_goldens as lsg  # noqa: E402  (sets the offline environment first)
import torch  # noqa: E402
import transformers  # noqa: E402

SPARSITY_TYPES = ("norm", "stride", "bos_pooling")
LENGTHS = (40, 27, 13)  # over 2 blocks of 8 (sparse attention acts), between, under
SMALL_LSG = dict(block_size=8, sparse_block_size=8, max_position_embeddings=64, tie_word_embeddings=False)


def build(mod, tokenizer, folder: Path, sparsity_type: str):
    config = mod.LSGPegasusConfig(
        **{**lsg.BASE_CONFIG, **SMALL_LSG, "sparsity_type": sparsity_type, "vocab_size": len(tokenizer)}
    )
    torch.manual_seed(lsg.WEIGHT_SEED)
    model = mod.LSGPegasusForConditionalGeneration(config).eval()
    lsg.init_strong_weights(model, lsg.WEIGHT_SEED)
    model.generation_config = legacy.pegasus_generation_config()
    legacy.tune_eos_bias(model, tokenizer, model.final_logits_bias[0], LENGTHS)
    model.save_pretrained(str(folder), safe_serialization=True)
    shutil.copy(lsg.reference_modeling_path(), folder / "modeling_lsg_pegasus.py")
    tokenizer.save_pretrained(str(folder))
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(folder), trust_remote_code=True).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), f"save/load round trip changed {name}"
    return reloaded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizers", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    assert transformers.__version__ == "4.47.1", transformers.__version__
    mod = lsg.load_reference_module(lsg.reference_modeling_path())
    for sparsity_type in SPARSITY_TYPES:
        folder = args.out / f"lsg_pegasus_untied_{sparsity_type}"
        shutil.rmtree(folder, ignore_errors=True)
        # the slow (sentencepiece) class: this venv has no protobuf for the fast one's conversion
        tokenizer = transformers.PegasusTokenizer(
            str(args.tokenizers / "pegasus" / "spiece.model"), model_max_length=64
        )
        model = build(mod, tokenizer, folder, sparsity_type)
        legacy.write_goldens(model, tokenizer, folder, LENGTHS)
        print(f"{folder.name}: {sum(f.stat().st_size for f in folder.iterdir()) / 1e3:.0f} kB", file=sys.stderr)
    os.environ.pop("HF_HOME", None)


if __name__ == "__main__":
    main()
