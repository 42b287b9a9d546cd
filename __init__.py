"""ortseq: export seq2seq summarizers to ONNX (`ortseq.exporter`, needs torch) and run them with ONNX
Runtime (`ortseq.runtime`, needs neither torch nor transformers); `ortseq.graphs` is the contract both read.

This file is the `ortseq` package itself: pyproject.toml maps the package onto the repository root, so
the folders runtime/, graphs/ and exporter/ install as ortseq.runtime, ortseq.graphs, ortseq.exporter.
"""

# pytest imports this file on its own, as a module with no package, when the checkout's folder is not a
# valid package name (a clone in `ortseq-ci/`): it then has nothing to import relative to, and is not ortseq.
if __package__:
    from .graphs import __version__

__all__ = ["InvalidInputError", "ManifestError", "Seq2SeqModel", "__version__"]


def __getattr__(name: str):
    # lazily, so that `import ortseq.exporter` does not load onnxruntime before torch
    if name in ("InvalidInputError", "ManifestError", "Seq2SeqModel"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'ortseq' has no attribute {name!r}")
