"""Fixtures: tiny random Pegasus checkpoints of several shapes, exported once per test session."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import SHAPES, seed_of, with_peaked

from ortseq.exporter.pipeline import export
from ortseq.exporter.tiny.pegasus import build_tiny_pegasus

torch.set_num_threads(1)  # multi-threaded torch on a loaded 2-core machine is very slow
logging.getLogger("ortseq").setLevel(logging.WARNING)


class ExportedModel:
    def __init__(self, checkpoint: Path, export_dir: Path):
        from transformers import PegasusForConditionalGeneration

        self.checkpoint = checkpoint
        self.export_dir = export_dir
        self.torch_model = PegasusForConditionalGeneration.from_pretrained(str(checkpoint)).eval()


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(name) -> ExportedModel for a shape of SHAPES (or its peaked twin: the same weights with a
    likelier end token, helpers.with_peaked), built and exported once."""
    cache: dict[str, ExportedModel] = {}

    def get(name: str) -> ExportedModel:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            checkpoint = build_tiny_pegasus(root / "checkpoint", with_peaked(SHAPES)[name], seed=seed_of(SHAPES, name))
            export(str(checkpoint), root / "export")
            cache[name] = ExportedModel(checkpoint, root / "export")
        return cache[name]

    return get


@dataclass
class TinyExport:
    checkpoint: Path  # the tiny model's checkpoint folder, as its builder saved it
    export_dir: Path  # its fp32 export


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """tiny_export(kind) -> TinyExport of the tiny model "tiny:KIND" (any family's), built and exported once."""
    from ortseq.exporter.families import tiny_builder

    cache: dict[str, TinyExport] = {}

    def get(kind: str) -> TinyExport:
        if kind not in cache:
            root = tmp_path_factory.mktemp(f"tiny-{kind}")
            checkpoint = tiny_builder(kind)(root / "checkpoint")
            export(str(checkpoint), root / "export")
            cache[kind] = TinyExport(Path(checkpoint), root / "export")
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory):
    """tiny-pegasus-trained exported once per session (trained once per user: exporter/tiny/trained.py)."""
    out = tmp_path_factory.mktemp("trained") / "fp32"
    export("tiny-pegasus-trained", out)
    return out


@pytest.fixture(autouse=True)
def search_step_on_cpu(request, monkeypatch):
    """Every test runs the search step graph on the CPU too (the runtime's CPU default is numpy, measured
    faster there), so the parity suites check the path devices take; `host_search_on_cpu` opts out."""
    from ortseq.runtime.engines import LoopEngine

    if request.node.get_closest_marker("host_search_on_cpu") is None:
        monkeypatch.setattr(LoopEngine, "search_step_on_cpu", True)


@pytest.fixture
def gate_calls(monkeypatch):
    """The (quality report, (mode, token agreement)) pairs the quantization gate judged during the test."""
    from ortseq.exporter.quantization import pipeline

    calls = []
    real_gate = pipeline.lowest_agreement

    def recording_gate(report):
        verdict = real_gate(report)
        calls.append((report, verdict))
        return verdict

    monkeypatch.setattr(pipeline, "lowest_agreement", recording_gate)
    return calls
