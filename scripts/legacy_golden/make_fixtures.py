"""Step 2 of `make legacy-golden`: tiny checkpoints written by transformers 4.x, with 4.x's own generate().

Self-contained (torch + transformers only): it runs in the pinned venvs, not ortseq's.
  .venv-hf457/bin/python make_fixtures.py TOKENIZERS OUT     (transformers 4.57.6)
TOKENIZERS is the folder tokenizer_files.py wrote (ortseq's venv); each tokenizer is loaded and saved
again here, so every committed file is written by the 4.x version.

Each fixture folder holds the checkpoint (save_pretrained) and goldens.json: the inputs, and per case
its transformers generate() kwargs and the sequences generate() returned. Every case is checked to be
non-degenerate (input rows of varied lengths; every output row several tokens long, the rows not all
equal), and a case of one generation field is kept only where the field changes the tokens against the
same call without it: a field that changes nothing on a fixture (min_new_tokens where no row ends
early) would test nothing, and goldens.json lists it under fields_without_effect. Beam cases set
early_stopping=True: without it 4.x and 5.x stop beams by different rules.
Usage: make_fixtures.py TOKENIZERS OUT [NAME ...] (default: every fixture).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import transformers

SEED = 0
BATCH_LENGTHS = (14, 9, 5)  # input rows of varied lengths, right-padded
MAX_NEW = 12  # greedy / beam cases; the "defaults" case has max_length unset (20 new tokens)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizers", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("names", nargs="*", help="fixtures to write (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.names or FIXTURES:
        build = FIXTURES[name]
        folder = args.out / name
        shutil.rmtree(folder, ignore_errors=True)
        model, tokenizer, batch = build(args.tokenizers, folder)
        write_goldens(model, tokenizer, folder, batch)
        print(f"{name}: {sum(f.stat().st_size for f in folder.iterdir()) / 1e3:.0f} kB", file=sys.stderr)


# ---------------------------------------------------------------- models

# The vocabulary files tokenizer_files.py trained, built into this version's tokenizer classes (its
# tokenizer_config.json, written by 5.x, does not load in 4.x).
TOKENIZER_CLASSES = {
    "pegasus": lambda d: transformers.PegasusTokenizerFast(vocab_file=str(d / "spiece.model"), model_max_length=64),
    "bert2bert": lambda d: transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True),
    "roberta2roberta": lambda d: transformers.RobertaTokenizerFast(str(d / "vocab.json"), str(d / "merges.txt")),
    "bertgeneration": lambda d: transformers.BertGenerationTokenizer(vocab_file=str(d / "spiece.model")),
    "bart": lambda d: transformers.BartTokenizerFast(str(d / "vocab.json"), str(d / "merges.txt")),
}


def load_tokenizer(tokenizers: Path, kind: str):
    return TOKENIZER_CLASSES[kind](tokenizers / kind)


def pegasus_config(tokenizer, **extra):
    return transformers.PegasusConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        activation_function="relu", scale_embedding=True, init_std=0.3, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, forced_eos_token_id=1, **extra,
    )  # fmt: skip


def strengthen_pegasus(model) -> None:
    """Outputs that depend on the input (see exporter/tiny.py _make_outputs_input_dependent)."""
    with torch.no_grad():
        embeddings = model.model.shared.weight
        norms = embeddings.norm(dim=1, keepdim=True)
        embeddings.mul_(norms.mean() / norms.clamp_min(1e-6))
        for layer in model.model.decoder.layers:
            layer.encoder_attn.q_proj.weight.mul_(3.0)
            layer.encoder_attn.k_proj.weight.mul_(3.0)


def pegasus_generation_config():
    # no max_length: the default (20) applies, to new tokens for encoder-decoders
    return transformers.GenerationConfig(
        num_beams=4, early_stopping=True, length_penalty=0.6, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, forced_eos_token_id=1,
    )  # fmt: skip


def build_pegasus(tokenizers: Path, folder: Path, tied: bool):
    tokenizer = load_tokenizer(tokenizers, "pegasus")
    torch.manual_seed(SEED)
    model = transformers.PegasusForConditionalGeneration(pegasus_config(tokenizer, tie_word_embeddings=tied)).eval()
    strengthen_pegasus(model)
    model.generation_config = pegasus_generation_config()
    tune_eos_bias(model, tokenizer, model.final_logits_bias[0], BATCH_LENGTHS)
    return save_and_reload(model, tokenizer, folder, transformers.PegasusForConditionalGeneration), tokenizer, None


BART_TOKEN_IDS = dict(  # bart-large-cnn's: start with </s>, force <s> next and </s> last
    bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0,
    forced_eos_token_id=2,
)  # fmt: skip
# bart-large-cnn's search, min_length scaled down to the tiny lengths (it counts the decoder start)
BART_SEARCH = dict(num_beams=4, early_stopping=True, length_penalty=2.0, no_repeat_ngram_size=3, min_length=9)


def build_bart_generation_in_config(tokenizers: Path, folder: Path):
    """A tied BART in bart-large-cnn's layout, its generation fields in config.json and no
    generation_config.json: checkpoints written before transformers 4.26 (and the hub's copies of them)
    look so, and 4.x builds the generation config from config.json. The checkpoint is saved by this
    version, then its generation fields are moved back to where the old versions wrote them."""
    tokenizer = load_tokenizer(tokenizers, "bart")
    config = transformers.BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        activation_function="gelu", scale_embedding=False, init_std=0.3, **BART_TOKEN_IDS,
    )  # fmt: skip
    torch.manual_seed(SEED)
    model = transformers.BartForConditionalGeneration(config).eval()
    strengthen_pegasus(model)  # the same module names: model.shared, decoder.layers[i].encoder_attn
    model.generation_config = transformers.GenerationConfig(**BART_TOKEN_IDS, **BART_SEARCH)
    tune_eos_bias(model, tokenizer, model.final_logits_bias[0], BATCH_LENGTHS)
    save_and_reload(model, tokenizer, folder, transformers.BartForConditionalGeneration)
    (folder / "generation_config.json").unlink()
    config_file = folder / "config.json"
    fields = {**json.loads(config_file.read_text()), **BART_TOKEN_IDS, **BART_SEARCH}
    config_file.write_text(json.dumps(fields, indent=2) + "\n")
    reloaded = transformers.BartForConditionalGeneration.from_pretrained(str(folder)).eval()
    for field, value in {**BART_TOKEN_IDS, **BART_SEARCH}.items():
        assert getattr(reloaded.generation_config, field) == value, f"{field} not read from config.json"
    ids, mask = fixture_batch(reloaded, tokenizer, BATCH_LENGTHS)
    greedy = {"num_beams": 1, "max_new_tokens": MAX_NEW}
    without_min_length = run(reloaded, ids, mask, {**greedy, "min_length": 0})
    assert not torch.equal(run(reloaded, ids, mask, greedy), without_min_length), "min_length changes nothing"
    return reloaded, tokenizer, None


ENCODER_DECODER_SPECIALS = {  # decoder start, eos, pad tokens of the real checkpoints
    "bert2bert": ("BertConfig", "[CLS]", "[SEP]", "[PAD]", 0),
    "roberta2roberta": ("RobertaConfig", "<s>", "</s>", "<pad>", 2),
    "bertgeneration": ("BertGenerationConfig", "<s>", "</s>", "<pad>", 0),
}


def build_encoder_decoder(tokenizers: Path, folder: Path, kind: str, tie_encoder_decoder: bool = False):
    tokenizer = load_tokenizer(tokenizers, kind)
    config_class, *specials, position_offset = ENCODER_DECODER_SPECIALS[kind]
    start, eos, pad = tokenizer.convert_tokens_to_ids(specials)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64 + position_offset, initializer_range=0.3, hidden_act="gelu", pad_token_id=pad,
        bos_token_id=start, eos_token_id=eos,
    )  # fmt: skip
    config_class = getattr(transformers, config_class)
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        config_class(num_hidden_layers=2, **common),
        config_class(num_hidden_layers=2, is_decoder=True, add_cross_attention=True, **common),
        decoder_start_token_id=start, pad_token_id=pad, eos_token_id=eos, tie_encoder_decoder=tie_encoder_decoder,
    )  # fmt: skip
    torch.manual_seed(SEED)
    model = transformers.EncoderDecoderModel(config=config).eval()
    strengthen_encoder_decoder(model, eos)
    model.generation_config = transformers.GenerationConfig(
        num_beams=4, early_stopping=True, length_penalty=0.8, decoder_start_token_id=start, bos_token_id=start,
        eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip
    tune_eos_bias(model, tokenizer, model.decoder.get_output_embeddings().bias, BATCH_LENGTHS)
    reloaded = save_and_reload(model, tokenizer, folder, transformers.EncoderDecoderModel)
    return reloaded, tokenizer, None


def strengthen_encoder_decoder(model, eos: int) -> None:
    """See exporter/tiny_encoder_decoder.py _make_outputs_input_dependent."""
    with torch.no_grad():
        for embeddings in (model.encoder.get_input_embeddings(), model.decoder.get_input_embeddings()):
            norms = embeddings.weight.norm(dim=1, keepdim=True)
            embeddings.weight.mul_(norms.mean() / norms.clamp_min(1e-6))
        for layer in model.decoder.base_model.encoder.layer:
            layer.crossattention.self.query.weight.mul_(3.0)
            layer.crossattention.self.key.weight.mul_(3.0)
        model.decoder.base_model.embeddings.position_embeddings.weight.mul_(5.0)


def tune_eos_bias(model, tokenizer, logits_bias: torch.Tensor, lengths) -> None:
    """The strongest EOS logit bias (steps of 0.25) with which no greedy output ends within three tokens:
    random models otherwise repeat one token forever, and a field like min_new_tokens then acts on nothing."""
    eos = model.generation_config.eos_token_id
    chosen = 0.0
    for step in range(41):
        with torch.no_grad():
            logits_bias[eos] = 0.25 * step
        ids, mask = fixture_batch(model, tokenizer, lengths)
        seed_generated_tokens(model, ids, mask, model.generation_config)  # the inputs the goldens will use
        defaults = run(model, ids, mask, {})
        rows = run(model, ids, mask, {"num_beams": 1}).tolist() + defaults.tolist()
        too_short = min(row.index(eos, 1) + 1 if eos in row[1:] else len(row) for row in rows) < 4
        if too_short or defaults.shape[1] < 21:  # the defaults case shows the 20-new-tokens rule
            break
        chosen = 0.25 * step
    with torch.no_grad():
        logits_bias[eos] = chosen


def save_and_reload(model, tokenizer, folder: Path, model_class, **load_kwargs):
    """Write the checkpoint as users have them; goldens come from the reloaded model, as a user runs it."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    reloaded = model_class.from_pretrained(str(folder), **load_kwargs).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), f"save/load round trip changed {name}"
    return reloaded


FIXTURES = {
    "pegasus_tied": lambda tok, out: build_pegasus(tok, out, tied=True),
    "pegasus_untied": lambda tok, out: build_pegasus(tok, out, tied=False),
    "bert2bert": lambda tok, out: build_encoder_decoder(tok, out, "bert2bert"),
    # tie_encoder_decoder: 4.x stores the shared weights once, under the encoder's names
    "roberta2roberta_tied": lambda tok, out: build_encoder_decoder(tok, out, "roberta2roberta", True),
    "bertgeneration": lambda tok, out: build_encoder_decoder(tok, out, "bertgeneration"),
    "bart_generation_in_config": build_bart_generation_in_config,
}

# ---------------------------------------------------------------- inputs and goldens


def batch_of(lengths, vocab: int, pad: int, low: int):
    generator = torch.Generator().manual_seed(SEED + 1)
    ids = torch.full((len(lengths), max(lengths)), pad)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(low, vocab, (length,), generator=generator)
        mask[row, :length] = 1
    return ids, mask


def fixture_batch(model, tokenizer, lengths):
    """Random ids above the special tokens, rows of the given lengths, right-padded with the pad id."""
    gen = model.generation_config
    special = {gen.pad_token_id, gen.eos_token_id, gen.decoder_start_token_id, *tokenizer.all_special_ids}
    low = max(special) + 1 if max(special) < 10 else 5
    return batch_of(lengths, model.get_output_embeddings().out_features, gen.pad_token_id, low)


def write_goldens(model, tokenizer, folder: Path, lengths) -> None:
    gen = model.generation_config
    ids, mask = fixture_batch(model, tokenizer, lengths or BATCH_LENGTHS)
    seed_generated_tokens(model, ids, mask, gen)
    cases, without_effect = build_cases(model, ids, mask, gen)
    goldens = {
        "writer": {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]},
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "cases": cases,
        "fields_without_effect": without_effect,
    }
    (folder / "goldens.json").write_text(json.dumps(goldens, indent=1) + "\n")


def seed_generated_tokens(model, ids, mask, gen) -> None:
    """Put tokens the model generates into the input rows, so that a case of encoder_no_repeat_ngram_size
    (bans generating the input's n-grams) has something to ban: each round writes a row's most frequent
    generated token into its next position, until every row generates a token of its input."""
    for position in range(4):
        probe = run(model, ids, mask, {"num_beams": 1, "max_new_tokens": MAX_NEW})
        done = True
        for row in range(ids.shape[0]):
            generated = [int(t) for t in probe[row, 1:] if int(t) not in (gen.eos_token_id, gen.pad_token_id)]
            if not generated or set(generated) & set(ids[row].tolist()):
                continue
            done = False
            ids[row, position] = max(set(generated), key=lambda t: (generated.count(t), -t))
        if done:
            return


def run(model, ids, mask, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kwargs)


def build_cases(model, ids, mask, gen) -> tuple[list[dict], list[str]]:
    """(cases, the generation fields that change nothing on this model and so have no case)."""
    eos = gen.eos_token_id
    greedy = {"num_beams": 1, "max_new_tokens": MAX_NEW}
    base = run(model, ids, mask, greedy)
    cases = [
        case("greedy", greedy, base, eos),
        case("beams4", {"num_beams": 4, "max_new_tokens": MAX_NEW, "early_stopping": True},
             run(model, ids, mask, {"num_beams": 4, "max_new_tokens": MAX_NEW, "early_stopping": True}), eos),
    ]  # fmt: skip
    defaults = run(model, ids, mask, {})
    assert defaults.shape[1] == 21, f"the defaults should run to 20 new tokens: {defaults.tolist()}"
    cases.append(case("defaults_max_length_unset", {}, defaults, eos))
    beams = {"num_beams": 4, "max_new_tokens": MAX_NEW, "early_stopping": True}
    without_effect = []
    for name, candidates in field_candidates(base, ids, gen).items():
        # min_new_tokens acts only where EOS would come early: the beams' hypotheses, or runs kept from
        # repeating one token forever (random models do) by an n-gram ban
        bases = (
            [greedy, beams, {}, {**greedy, "no_repeat_ngram_size": 2}, {**beams, "no_repeat_ngram_size": 2}]
            if name == "min_new_tokens"
            else [greedy]
        )
        field = field_case(model, ids, mask, bases, name, candidates, eos)
        if field is None:
            without_effect.append(name)
        else:
            cases.append(field)
    return cases, without_effect


def field_candidates(base: torch.Tensor, ids: torch.Tensor, gen) -> dict[str, list[dict]]:
    """Per generation field, values to try in order: the first that changes the greedy tokens is kept."""
    generated = [int(t) for t in base[:, 1:].flatten() if int(t) not in (gen.eos_token_id, gen.pad_token_id)]
    first = [int(t) for t in base[:, 1]]
    frequent = sorted(set(generated), key=lambda t: (-generated.count(t), t))
    spares = [t for t in range(5, 50) if t not in first][:4]
    return {
        "forced_bos_token_id": [{"forced_bos_token_id": spare} for spare in spares],
        "repetition_penalty": [{"repetition_penalty": p} for p in (1.5, 2.0, 3.0, 5.0)],
        "bad_words_ids": [{"bad_words_ids": [[frequent[0]], [int(base[0, 2]), int(base[0, 3])]]}],
        "suppress_tokens": [{"suppress_tokens": frequent[:2]}],
        "begin_suppress_tokens": [{"begin_suppress_tokens": [first[0]]}],
        "encoder_no_repeat_ngram_size": [{"encoder_no_repeat_ngram_size": n} for n in (1, 2)],
        "min_new_tokens": [{"min_new_tokens": n} for n in (MAX_NEW - 1, MAX_NEW // 2, 19)],
        "no_repeat_ngram_size": [{"no_repeat_ngram_size": n} for n in (2, 1)],
    }


def field_case(model, ids, mask, bases: list[dict], name: str, candidates: list[dict], eos: int) -> dict | None:
    """The case of the first value that changes the tokens of one of bases; None if none does."""
    for base_kwargs in bases:
        base = run(model, ids, mask, base_kwargs)
        for extra in candidates:
            kwargs = {**base_kwargs, **extra}
            out = run(model, ids, mask, kwargs)
            changed = out.shape != base.shape or not torch.equal(out, base)
            if changed and not degenerate(out, eos):  # else the next value: a case must test something
                return case(name, kwargs, out, eos)
    print(f"{name}: no value in {candidates} changes the tokens: no case", file=sys.stderr)
    return None


def case(name: str, kwargs: dict, sequences: torch.Tensor, eos: int) -> dict:
    """A golden case, after checking it is not degenerate."""
    assert not degenerate(sequences, eos), (
        f"{name}: a row ends within two tokens, or every row is the same: {sequences.tolist()}"
    )
    return {"name": name, "kwargs": kwargs, "sequences": sequences.tolist()}


def degenerate(sequences: torch.Tensor, eos: int) -> bool:
    """A row that ends within two new tokens, or every row the same."""
    rows = sequences.tolist()
    lengths = [row.index(eos, 1) + 1 if eos in row[1:] else len(row) for row in rows]
    return min(lengths) < 4 or len({tuple(row) for row in rows}) == 1


if __name__ == "__main__":
    main()
