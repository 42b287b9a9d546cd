"""Small random Pegasus models built locally, offline, with their own sentencepiece tokenizer.

``tiny-pegasus`` is the embedded default of the main job: a real checkpoint folder
(save_pretrained) that goes through exactly the same export path as a hub checkpoint.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from ortseq.exporter.progress import log

# Pegasus' layout: pad 0, eos 1, unk 2 in the sentencepiece model; transformers' PegasusTokenizer then
# puts <pad>, </s>, <mask_1>, <mask_2> and <unk_2>..<unk_102> in front (offset 103).
_WORDS = (
    "the a of to and in is was for on that with as by at from his her it an are were which be this has had "
    "have not but its their they he she who one new after first been also more two than other year years "
    "when would there into over only city government people team time world state school company season "
    "river music film game war party church police court report council market water energy village "
    "summary article study research minister president election museum station island bridge festival "
    "said says will can may could should made make found found announced reported expected increased"
).split()


def _synthetic_corpus(num_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 30))]
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(1, 2030)))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), rng.choice(["café", "naïve", "Zürich", "São", "—", "€5"]))
        lines.append(" ".join(words) + rng.choice([".", ".", "!", "?", ","]))
    return lines


def train_pegasus_sentencepiece(out_dir: Path, vocab_size: int = 400, seed: int = 0) -> Path:
    """Train a unigram sentencepiece model with Pegasus' special-token ids; returns spiece.model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = _synthetic_corpus(4000, seed)
    return train_unigram_sentencepiece(out_dir, lines, vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)


def train_unigram_sentencepiece(out_dir: Path, lines: list[str], vocab_size: int, **special_ids: int) -> Path:
    """out_dir/spiece.model trained on lines, with the given pad/eos/unk/bos ids (-1: none)."""
    import sentencepiece as spm

    corpus = out_dir / "_corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out_dir / "spiece"),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        **special_ids,
    )
    corpus.unlink()
    (out_dir / "spiece.vocab").unlink(missing_ok=True)
    return out_dir / "spiece.model"


def build(kind: str, out_dir: Path) -> Path:
    """Build the tiny model named kind ("pegasus", "lsg-pegasus", "pegasus-trained" or an encoder-decoder kind)."""
    from ortseq.exporter import tiny_encoder_decoder
    from ortseq.exporter.tiny_lsg import build_tiny_lsg_pegasus
    from ortseq.exporter.trained_tiny import build_trained_tiny_pegasus

    if kind in tiny_encoder_decoder.KINDS:
        return tiny_encoder_decoder.build(kind, out_dir)
    builders = {
        "pegasus": build_tiny_pegasus,
        "lsg-pegasus": build_tiny_lsg_pegasus,
        "pegasus-trained": build_trained_tiny_pegasus,
    }
    if kind not in builders:
        raise ValueError(f"no tiny model called {kind!r}; known: {sorted(builders)}")
    return builders[kind](out_dir)


@dataclass(frozen=True)
class TinyPegasusShape:
    """Sizes of a small random Pegasus; the defaults are tiny-pegasus, the main job's model."""

    d_model: int = 64
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ffn_dim: int = 128
    extra_vocab: int = 0  # model vocab beyond the tokenizer's (allowed by Pegasus, exercises odd sizes)
    max_position_embeddings: int = 256
    init_std: float = 0.3  # larger than 0.02 so that outputs depend on the input (no near-uniform logits)
    eos_logit_bias: float = 3.0  # makes hypotheses end at varied lengths (exercises finished beams)
    # Pegasus ties the LM head to the embeddings; a random tied model repeats its last token forever,
    # so the tiny default is untied (both layouts export the same way).
    tie_embeddings: bool = False


def build_tiny_pegasus(out_dir: Path, shape: TinyPegasusShape = TinyPegasusShape(), seed: int = 0) -> Path:
    """Save a small random Pegasus (and its tokenizer) to out_dir, as save_pretrained would."""
    import torch
    from transformers import GenerationConfig, PegasusForConditionalGeneration

    out_dir = Path(out_dir)
    log(f"building tiny-pegasus in {out_dir} (sentencepiece trained on the spot)")
    spiece = train_pegasus_sentencepiece(out_dir / "_spm", seed=seed)
    tokenizer = _pegasus_tokenizer_from_spiece(spiece, shape.max_position_embeddings)
    config = small_pegasus_config(
        shape,
        vocab_size=len(tokenizer) + shape.extra_vocab,
        init_std=shape.init_std,
        tie_word_embeddings=shape.tie_embeddings,
    )
    torch.manual_seed(seed)
    model = PegasusForConditionalGeneration(config).eval()
    _make_outputs_input_dependent(model, shape.eos_logit_bias)
    model.generation_config = GenerationConfig(num_beams=4, max_length=32, length_penalty=0.6, **PEGASUS_TOKEN_IDS)
    save_pegasus_checkpoint(model, tokenizer, spiece, out_dir)
    return out_dir


# Pegasus' special-token layout: pad 0 (also the decoder start), EOS 1, forced as the last token.
PEGASUS_TOKEN_IDS = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=1)


def small_pegasus_config(sizes, vocab_size: int, **extra):
    """A PegasusConfig with Pegasus' layout (relu, scaled embeddings, its token ids) at small sizes.

    sizes: anything with d_model, heads, encoder_layers, decoder_layers, ffn_dim, max_position_embeddings.
    """
    from transformers import PegasusConfig

    return PegasusConfig(
        vocab_size=vocab_size,
        d_model=sizes.d_model,
        encoder_layers=sizes.encoder_layers,
        decoder_layers=sizes.decoder_layers,
        encoder_attention_heads=sizes.heads,
        decoder_attention_heads=sizes.heads,
        encoder_ffn_dim=sizes.ffn_dim,
        decoder_ffn_dim=sizes.ffn_dim,
        max_position_embeddings=sizes.max_position_embeddings,
        activation_function="relu",
        scale_embedding=True,
        **PEGASUS_TOKEN_IDS,
        **extra,
    )


def save_pegasus_checkpoint(model, tokenizer, spiece: Path, out_dir: Path) -> None:
    """save_pretrained of model and tokenizer, plus spiece.model as real Pegasus checkpoints ship it;
    the sentencepiece training folder is removed."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    shutil.copy(spiece, Path(out_dir) / "spiece.model")
    shutil.rmtree(spiece.parent)


def _make_outputs_input_dependent(model, eos_logit_bias: float) -> None:
    """Random init makes a tied-embedding decoder repeat its largest-norm token whatever the input.

    Equal-norm embedding rows and stronger cross-attention make the tokens depend on the input, so
    that a wrong mask, position or cache entry changes the output (tests rely on this).
    """
    import torch

    with torch.no_grad():
        embeddings = model.model.shared.weight
        norms = embeddings.norm(dim=1, keepdim=True)
        embeddings.mul_(norms.mean() / norms.clamp_min(1e-6))  # the pad row stays zero
        for layer in model.model.decoder.layers:
            layer.encoder_attn.q_proj.weight.mul_(3.0)
            layer.encoder_attn.k_proj.weight.mul_(3.0)
        model.final_logits_bias[0, model.config.eos_token_id] += eos_logit_bias


def _pegasus_tokenizer_from_spiece(spiece: Path, model_max_length: int):
    """transformers 5.x builds Pegasus' tokenizer from a folder with spiece.model and a config naming it."""
    import json

    from transformers import AutoTokenizer

    folder = spiece.parent
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PegasusTokenizer", "model_max_length": model_max_length})
    )
    return AutoTokenizer.from_pretrained(str(folder))
