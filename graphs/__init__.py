"""The contract shared by exporter/ and runtime/: graph I/O names, the manifest, custom ops.

Nothing here imports torch: the runtime reads it too.
"""

__version__ = "0.3.0"
