"""The checkpoint zoo: a committed 4.x checkpoint written again, by a transformers 4.x, as users download them.

Self-contained (torch + transformers only): it runs in a pinned 4.x venv, not ortseq's.
  .venv-hf457/bin/python relay.py JOBS.json       (transformers 4.57.6: Pegasus, BART, EncoderDecoderModel)
  .venv-lsg-ref/bin/python relay.py JOBS.json     (transformers 4.47.1 + lsg-converter: LSG-Pegasus)
JOBS.json is a list of {"source", "out", "layout", "dtype", "variant"}: source a fixture folder of
tests/fixtures/legacy (its checkpoint and goldens.json), out the folder to write (written beside, then
renamed). Each job loads the source as a user of this version does, casts the weights to `dtype`,
saves them in `layout` (LAYOUTS), reloads the written checkpoint as this version loads it (float32 on a
CPU: stored fp16/bf16 weights upcast) and writes goldens.json: the source's inputs, this version's
generate() tokens for the source's greedy and 4-beam cases, and its float32 logits of each decoder step
when fed the greedy tokens (as generate() runs it, one step at a time with its cache): on tiny models an
export that rounded weights through another dtype, or computed a layer in reduced precision, may still
give the same tokens, never the same logits.

variant: "" (as saved), "without_pooler" (EncoderDecoderModel: the encoder saved without its pooler, as
checkpoints built from BertModel(add_pooling_layer=False) are; generation never reads it), or
"position_ids" (EncoderDecoderModel: the embeddings' position_ids buffers saved, as versions before
4.31 did and 5.x no longer has).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import transformers

LAYOUTS = ("model.safetensors", "sharded-safetensors", "pytorch_model.bin", "pytorch_model.bin-legacy", "sharded-bin")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CASES = ("greedy", "beams4")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.bin.index.json", "*.safetensors.index.json", "goldens.json")


def load(folder: Path):
    remote = (folder / "config.json").is_file() and "auto_map" in json.loads((folder / "config.json").read_text())
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(folder), trust_remote_code=remote)
    return model.eval()


def save(model, out: Path, layout: str) -> None:
    sharded = layout.startswith("sharded")
    safe = layout in ("model.safetensors", "sharded-safetensors")
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    shard = size // 3 if sharded else 10 * size  # sharded: three or four shards, whatever the stored dtype
    model.save_pretrained(str(out), safe_serialization=safe, max_shard_size=shard)
    written = sorted(out.glob("*.safetensors" if safe else "*.bin"))
    assert (len(written) > 1) == sharded, (layout, written)
    if layout == "pytorch_model.bin-legacy":  # torch's pre-1.6 serialization, as 2020-era checkpoints are
        state = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
        torch.save(state, out / "pytorch_model.bin", _use_new_zipfile_serialization=False)


def apply_variant(model, variant: str) -> None:
    if variant == "without_pooler":
        assert model.encoder.pooler is not None
        model.encoder.pooler = None  # BertModel.forward skips a None pooler; save_pretrained stores none
    elif variant == "position_ids":
        for side in (model.encoder, model.decoder):
            embeddings = side.base_model.embeddings
            embeddings.register_buffer("position_ids", embeddings.position_ids.clone(), persistent=True)
    else:
        assert variant == "", variant


def relay(job: dict) -> None:
    source, out = Path(job["source"]), Path(job["out"])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns(*WEIGHT_FILES))
    model = load(source)
    apply_variant(model, job["variant"])
    model.to(DTYPES[job["dtype"]])
    save(model, partial, job["layout"])
    reloaded = load(partial)  # as this version loads it: float32 on a CPU
    assert all(p.dtype == torch.float32 for p in reloaded.parameters()), "4.x should load in float32"
    write_goldens(reloaded, json.loads((source / "goldens.json").read_text()), partial, job)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def write_goldens(model, source_goldens: dict, folder: Path, job: dict) -> None:
    ids, mask = torch.tensor(source_goldens["input_ids"]), torch.tensor(source_goldens["attention_mask"])
    cases = []
    for case in source_goldens["cases"]:
        if case["name"] in CASES:
            with torch.no_grad():
                sequences = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **case["kwargs"])
            if job["dtype"] == "float32":  # the same weights: the source's own tokens
                assert sequences.tolist() == case["sequences"], (job, case["name"])
            cases.append({"name": case["name"], "kwargs": case["kwargs"], "sequences": sequences.tolist()})
    greedy = next(case["sequences"] for case in cases if case["name"] == "greedy")
    decoder_ids = torch.tensor(greedy)[:, :-1]
    goldens = {
        "writer": {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]},
        "job": {key: job[key] for key in ("layout", "dtype", "variant")},
        "weight_files": sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".safetensors", ".json")),
        "input_ids": source_goldens["input_ids"],
        "attention_mask": source_goldens["attention_mask"],
        "cases": cases,
        "step_logits": {"decoder_ids": decoder_ids.tolist(), "logits": step_logits(model, ids, mask, decoder_ids)},
    }
    (folder / "goldens.json").write_text(json.dumps(goldens, indent=1) + "\n")


def step_logits(model, ids, mask, decoder_ids) -> list:
    """[batch, steps, vocab] float32 logits of the decoder fed decoder_ids one step at a time with its cache."""
    past, logits = None, []
    with torch.no_grad():
        for step in range(decoder_ids.shape[1]):
            out = model(
                input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids[:, step : step + 1],
                past_key_values=past, use_cache=True,
            )  # fmt: skip
            past = out.past_key_values
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits, dim=1).tolist()


def main() -> None:
    torch.set_num_threads(1)
    for job in json.loads(Path(sys.argv[1]).read_text()):
        relay(job)
        print(f"{job['out']}: {job['layout']} {job['dtype']} {job['variant'] or '-'}", file=sys.stderr)


if __name__ == "__main__":
    main()
