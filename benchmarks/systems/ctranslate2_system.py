"""CTranslate2's Translator on its own conversion of the checkpoint (fp32, or int8 weights).

CTranslate2 works on token strings: ids are mapped through the vocabulary the conversion wrote.
Its Pegasus loader, like transformers, starts decoding from the pad token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# The converter reads these BART-style fields, which transformers 5's PegasusConfig no longer has:
# Pegasus is pre-LayerNorm and does not normalise its embeddings.
PEGASUS_CONFIG_FIELDS = {"normalize_before": True, "normalize_embedding": False}


def prepare(model, variant: str) -> Path:
    out = model.cache / f"ct2-{variant}"
    if (out / "model.bin").is_file():
        return out
    from ctranslate2.converters import TransformersConverter

    _pad_pegasus_vocabulary()
    print(f"[bench] converting {model.name} with CTranslate2 ({variant})", flush=True)
    source = model.cache / "ct2-source"  # the checkpoint's files, with the config fields added
    source.mkdir(parents=True, exist_ok=True)
    for item in Path(model.checkpoint).iterdir():
        if item.name != "config.json" and not (source / item.name).exists():
            (source / item.name).symlink_to(item.resolve())
    config = json.loads((Path(model.checkpoint) / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | PEGASUS_CONFIG_FIELDS, indent=2))
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    quantization = None if variant == "fp32" else variant
    TransformersConverter(str(source)).convert(str(staging), quantization=quantization, force=True)
    staging.rename(out)
    return out


def _pad_pegasus_vocabulary() -> None:
    """The random xsum-shaped model borrows tiny-pegasus's 503-token tokenizer for a 96,103-row
    embedding: name the rows past the tokenizer's, so that CTranslate2 accepts the vocabulary."""
    from ctranslate2.converters import transformers as ct2

    class PaddedPegasusLoader(ct2.PegasusLoader):
        def get_vocabulary(self, model, tokenizer):
            tokens = super().get_vocabulary(model, tokenizer)
            return tokens + [f"<extra_{i}>" for i in range(model.config.vocab_size - len(tokens))]

    ct2.register_loader("PegasusConfig")(PaddedPegasusLoader)


def load(model_dir: str, variant: str, threads: int):
    import ctranslate2
    import numpy as np

    translator = ctranslate2.Translator(model_dir, device="cpu", intra_threads=threads, inter_threads=1)
    vocabulary = json.loads((Path(model_dir) / "shared_vocabulary.json").read_text())
    index = {token: i for i, token in enumerate(vocabulary)}
    start = np.array([index["<pad>"]])

    def generate(ids, num_beams: int, new_tokens: int):
        source = [[vocabulary[i] for i in row] for row in ids.tolist()]
        results = translator.translate_batch(
            source,
            beam_size=num_beams,
            min_decoding_length=new_tokens,
            max_decoding_length=new_tokens,
            max_batch_size=0,
        )
        rows = [np.concatenate([start, [index[t] for t in r.hypotheses[0]]]) for r in results]
        return np.stack(rows)

    return generate
