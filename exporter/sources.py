"""Turn what the user typed (alias, hub id, local directory) into a local checkpoint directory."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from . import families
from .aliases import check_not_a_typo
from .errors import SourceError
from .progress import log

# Short names for `make export MODEL=...`, declared by each family. A value starting with "tiny:" is built
# locally, offline (the family's tiny builder).
ALIASES = families.aliases()

# A hub download fetches config.json first: its family says which files to fetch then (its
# Family.download_patterns), and a model no family exports is refused before its weights are fetched.
_CONFIG_PATTERNS = ["config.json"]


@contextmanager
def resolved_source(source: str, scratch: Path):
    """Yield a local directory holding the checkpoint named by source (built in scratch if tiny)."""
    target = ALIASES.get(source, source)
    if target.startswith("tiny:"):
        yield families.tiny_builder(target.removeprefix("tiny:"))(scratch / "checkpoint")
        return
    local = Path(os.path.expanduser(target))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise SourceError(f"{local} has no config.json: save the model there with save_pretrained() first")
        yield local
        return
    if local.exists() or target.startswith((".", "/", "~")) or target.count("/") > 1:
        raise SourceError(f"{target} is not a directory holding a saved model")
    check_not_a_typo(target)
    yield _download(target)


def _download(repo_id: str) -> Path:
    """The checkpoint folder of repo_id: config.json first, then the files its family asks for."""
    config_only = _snapshot(repo_id, _CONFIG_PATTERNS, ("config.json",))
    return _snapshot(repo_id, list(families.family_for(config_only).download_patterns()), _WEIGHT_FILES)


# A cached snapshot holding none of these is one whose config.json alone was fetched (a sharded checkpoint
# is complete with its index, which names its shards).
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _snapshot(repo_id: str, patterns: list[str], complete_with: tuple[str, ...]) -> Path:
    """The snapshot of repo_id's files matching patterns: the local hub cache's copy when it holds one of
    complete_with, else downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:  # a copy in the local hub cache works offline
        cached = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        if any((cached / name).is_file() for name in complete_with):
            return cached
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    log(f"downloading {repo_id} ({', '.join(patterns)}) from the Hugging Face hub")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError as exc:
        raise SourceError(f"{repo_id} is not a model on the Hugging Face hub (nor a local directory)") from exc
    except Exception as exc:  # connection errors come in many types, all mean the same to the user
        raise SourceError(
            f"cannot download {repo_id}: the Hugging Face hub is unreachable ({type(exc).__name__}).\n"
            f"To export offline, save the model on a machine with access "
            f"(AutoModelForSeq2SeqLM.from_pretrained('{repo_id}').save_pretrained(DIR), and the same for its "
            f"tokenizer), copy DIR here and run: ortseq export DIR --out OUT"
        ) from exc
