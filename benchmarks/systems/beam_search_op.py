"""ONNX Runtime's BeamSearch contrib op: the whole search in one graph (exporter/beam_search_op.py)."""

from __future__ import annotations

from pathlib import Path


def prepare(model, variant: str) -> Path:
    from ortseq.exporter.beam_search_op import export_beam_search_graph
    from ortseq.graphs.contract import BEAM_SEARCH_FILE

    out = model.cache / "beam-search-op"
    if not (out / BEAM_SEARCH_FILE).is_file():
        print(f"[bench] exporting {model.name} as one BeamSearch graph", flush=True)
        staging = out.with_name(out.name + ".partial")
        staging.mkdir(parents=True, exist_ok=True)
        export_beam_search_graph(model.checkpoint, staging / BEAM_SEARCH_FILE)
        staging.rename(out)
    return out


def load(model_dir: str, variant: str, threads: int):
    from ortseq.runtime.beam_search_op import BeamSearchOpModel

    model = BeamSearchOpModel.load(model_dir, threads=threads)

    def generate(ids, num_beams: int, new_tokens: int):
        return model.generate(ids, num_beams=num_beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    return generate
