"""Tiny checkpoints built locally and offline, one module per family (the `tiny:` sources).

Each module builds a real checkpoint folder (save_pretrained), so tiny models go through exactly the
export path of hub checkpoints. `text.py` holds the synthetic corpus and the tokenizer training they
share; `trained.py` trains tiny-pegasus-trained and tiny-bart-trained (cached under the user's cache
directory). The families (exporter/families/) name their builders; nothing here imports a family.
"""
