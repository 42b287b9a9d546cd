"""Tiny models that have really learned a task, so quantization quality means something:
`tiny-pegasus-trained` and `tiny-bart-trained`.

Random weights give near-uniform logits that flip on any noise, so agreement measured on them says
nothing. This module trains a small model of a family (tied embeddings, the family's layout and kind of
tokenizer) on a deterministic synthetic summarization task: news-like documents of a few sentences whose
summary is the lead sentence. What is family-specific (the untrained model and tokenizer, how the
checkpoint is saved) is the family's tiny module's `untrained_for_task` and `save_task_checkpoint`.
Everything is seeded and torch runs on one thread, so a clone trains the same model; the result is
cached under `<cache>/trained-tiny/<key>` (cache_dir(): $ORTSEQ_CACHE, else $XDG_CACHE_HOME/ortseq or
~/.cache/ortseq), the key hashing the task model's name, the settings and TRAINING_VERSION (bump it when
the task or the loop changes).

    python -m ortseq.exporter.tiny.trained [tiny-bart-trained]   # train (or reuse the cache), print the report
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..progress import log
from . import bart, pegasus

TRAINING_VERSION = 1
CACHE_ENV = "ORTSEQ_CACHE"  # overrides the cache directory (default: $XDG_CACHE_HOME/ortseq or ~/.cache/ortseq)
REPORT_FILE = "training_report.json"

# The synthetic "news": lead sentence = subject verb object place time; body sentences add detail.
_SUBJECTS = (
    "The city council", "The minister", "Police", "The company", "Researchers", "The school board",
    "Local residents", "The museum", "The football club", "The government", "Farmers", "The hospital",
    "The mayor", "Engineers", "The union", "The festival organisers", "Scientists", "The court",
)  # fmt: skip
_VERBS = (
    "approved", "announced", "rejected", "opened", "closed", "delayed", "expanded", "reported",
    "criticised", "welcomed", "completed", "cancelled", "funded", "inspected", "postponed", "launched",
)  # fmt: skip
_OBJECTS = (
    "a new bridge", "the river station", "plans for a school", "the summer festival", "a water project",
    "the old market", "a study on energy", "the island ferry", "a housing scheme", "the music hall",
    "a road repair", "the village library", "an election review", "a solar farm", "the harbour wall",
)  # fmt: skip
_PLACES = (
    "in Zurich", "near the harbour", "in the old town", "on the island", "in the north", "by the river",
    "in the capital", "at the station", "in the valley", "near the border", "in the south", "downtown",
)  # fmt: skip
_TIMES = (
    "on Monday", "on Sunday", "last week", "this year", "on Friday", "in March", "after the election",
    "before winter", "this morning", "in the autumn",
)  # fmt: skip
_DETAILS = (
    "Officials said the cost would reach {n} million.", "About {n} people attended the meeting.",
    "A spokesperson said more details would follow.", "The decision was expected for months.",
    "Critics said the plan came too late.", "The work is due to take {n} weeks.",
    "Residents were asked to send comments by email.", "It was the first such step since {y}.",
    "Several groups welcomed the news.", "The budget was increased by {n} percent.",
    "Others warned about the traffic and the noise.", "A final report is due next year.",
)  # fmt: skip


def lead_sentence(rng: random.Random) -> str:
    parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES)]
    if rng.random() < 0.6:
        parts.append(rng.choice(_TIMES))
    return " ".join(parts) + "."


def synthetic_document(rng: random.Random) -> tuple[str, str]:
    """(document, summary): a lead sentence followed by 2-4 detail sentences; the summary is the lead."""
    lead = lead_sentence(rng)
    details = [
        rng.choice(_DETAILS).format(n=rng.randint(2, 90), y=rng.randint(1950, 2024)) for _ in range(rng.randint(2, 4))
    ]
    return " ".join([lead, *details]), lead


def synthetic_documents(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [synthetic_document(rng) for _ in range(count)]


@dataclass(frozen=True)
class TrainingSettings:
    """Everything the trained model depends on; it is hashed into the cache key."""

    seed: int = 0
    spm_vocab_size: int = 320
    d_model: int = 96
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ffn_dim: int = 192
    max_position_embeddings: int = 128
    steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    held_out: int = 200  # documents from a seed the training never sees


@dataclass(frozen=True)
class TaskModel:
    """A family's model for the task: its alias, how its untrained model and tokenizer are made from the
    task's text, how the trained checkpoint is saved, and its training settings."""

    name: str
    untrained: Callable[[Path, list[str], Any], tuple[Any, Any]]  # (folder, lines, settings) -> (model, tokenizer)
    save: Callable[[Any, Any, Path], None]  # (model, tokenizer, folder)
    settings: TrainingSettings = TrainingSettings()

    def cache_key(self) -> str:
        text = json.dumps({"version": TRAINING_VERSION, "model": self.name, **asdict(self.settings)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


PEGASUS = TaskModel("tiny-pegasus-trained", pegasus.untrained_for_task, pegasus.save_task_checkpoint)
# BART learns the task in fewer steps (held-out greedy exact match 0.945 after 400 steps, measured)
BART = TaskModel("tiny-bart-trained", bart.untrained_for_task, bart.save_task_checkpoint, TrainingSettings(steps=600))
TASK_MODELS = {task.name: task for task in (PEGASUS, BART)}


def build_trained_tiny_pegasus(out_dir: Path) -> Path:
    """Copy the trained tiny Pegasus (training it first if it is not cached) to out_dir."""
    shutil.copytree(trained_checkpoint(PEGASUS), out_dir)
    return Path(out_dir)


def build_trained_tiny_bart(out_dir: Path) -> Path:
    """Copy the trained tiny BART (training it first if it is not cached) to out_dir."""
    shutil.copytree(trained_checkpoint(BART), out_dir)
    return Path(out_dir)


def cache_dir() -> Path:
    """ortseq's cache directory: $ORTSEQ_CACHE, else $XDG_CACHE_HOME/ortseq, else ~/.cache/ortseq (never
    inside the installed package, which may be read-only and is shared by every user)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ortseq"


def trained_checkpoint(task: TaskModel = PEGASUS) -> Path:
    """The cached checkpoint directory of task; trains it (a few minutes on CPU) on first use."""
    target = cache_dir() / "trained-tiny" / task.cache_key()
    if (target / REPORT_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".partial-", dir=target.parent) as tmp:
        staging = Path(tmp) / "checkpoint"
        _train(staging, task)
        if not target.exists():  # another process may have finished the same training meanwhile
            staging.rename(target)
    return target


def _train(out_dir: Path, task: TaskModel) -> None:
    import torch

    settings = task.settings
    torch.set_num_threads(1)
    torch.manual_seed(settings.seed)
    train_docs = synthetic_documents(settings.steps * settings.batch_size, settings.seed)
    text_lines = [text for pair in train_docs[:4000] for text in pair]
    model, tokenizer = task.untrained(out_dir, text_lines, settings)
    log(f"training {task.name}: {settings.steps} steps of {settings.batch_size} documents (CPU, 1 thread)")
    _fit(model, tokenizer, train_docs, settings)
    model.eval()
    report = held_out_report(model, tokenizer, settings)
    log(f"held-out greedy exact match: {report['greedy_exact_match']:.3f} on {report['documents']} documents")
    task.save(model, tokenizer, out_dir)
    (out_dir / REPORT_FILE).write_text(json.dumps({"model": task.name, **report}, indent=2) + "\n")


def _fit(model, tokenizer, docs: list[tuple[str, str]], settings: TrainingSettings) -> None:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / settings.warmup_steps) * (1 - step / settings.steps)
    )
    model.train()
    start = time.monotonic()
    for step in range(settings.steps):
        batch = docs[step * settings.batch_size : (step + 1) * settings.batch_size]
        inputs = tokenizer([doc for doc, _ in batch], return_tensors="pt", padding=True, truncation=True)
        labels = tokenizer([summary for _, summary in batch], return_tensors="pt", padding=True).input_ids
        labels[labels == tokenizer.pad_token_id] = -100
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 200 == 0 or step == settings.steps - 1:
            log(f"step {step}: loss {loss.item():.4f} ({time.monotonic() - start:.0f} s)")


def held_out_report(model, tokenizer, settings: TrainingSettings) -> dict:
    """Greedy exact match (generated summary == lead sentence) on documents never trained on."""
    import torch

    docs = synthetic_documents(settings.held_out, seed=settings.seed + 10_000)
    matches = 0
    with torch.no_grad():
        for start in range(0, len(docs), 50):
            chunk = docs[start : start + 50]
            inputs = tokenizer([doc for doc, _ in chunk], return_tensors="pt", padding=True, truncation=True)
            out = model.generate(**inputs, num_beams=1, max_length=40)
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            matches += sum(text.strip() == summary for text, (_, summary) in zip(texts, chunk))
    return {
        "task": "summary = lead sentence of a synthetic news document",
        "documents": len(docs),
        "greedy_exact_match": matches / len(docs),
        "settings": asdict(settings),
        "training_version": TRAINING_VERSION,
    }


if __name__ == "__main__":
    import logging
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    checkpoint = trained_checkpoint(TASK_MODELS[sys.argv[1] if len(sys.argv) > 1 else PEGASUS.name])
    print(checkpoint)
    print((checkpoint / REPORT_FILE).read_text())
