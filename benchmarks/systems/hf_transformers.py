"""transformers' generate() in PyTorch, on the checkpoint itself."""

from __future__ import annotations

from pathlib import Path


def prepare(model, variant: str) -> Path:
    return model.checkpoint


def load(model_dir: str, variant: str, threads: int):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    torch.set_num_threads(threads)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()

    def generate(ids, num_beams: int, new_tokens: int):
        with torch.no_grad():
            out = model.generate(
                torch.from_numpy(ids), num_beams=num_beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens
            )
        return out.numpy()

    return generate
