"""ortseq runtime: seq2seq generation over ONNX Runtime sessions. Needs neither torch nor transformers."""

from .errors import InvalidInputError, ManifestError
from .model import Seq2SeqModel

__all__ = ["InvalidInputError", "ManifestError", "Seq2SeqModel"]
