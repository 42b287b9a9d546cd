#!/usr/bin/env bash
# Create the pinned reference environment for LSG-Pegasus golden outputs.
# Usage (from anywhere): bash scripts/lsg_golden/setup_env.sh
# Creates <repo>/.venv-lsg-ref. Idempotent: does nothing when the venv already
# imports the pinned versions and can load the lsg_converter Pegasus modeling file.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv-lsg-ref"
PY="$VENV/bin/python"

check() {
  [ -x "$PY" ] || return 1
  "$PY" - <<'PY' >/dev/null 2>&1
import importlib.metadata as md, importlib.util, os, sys
want = {"torch": "2.13.0", "transformers": "4.47.1", "lsg-converter": "0.1.9"}
for name, ver in want.items():
    have = md.version(name)
    if have.split("+")[0] != ver:
        sys.exit(1)
for name in ("sentencepiece", "numpy", "safetensors"):
    md.version(name)
spec = importlib.util.find_spec("lsg_converter")
path = os.path.join(list(spec.submodule_search_locations)[0], "pegasus", "modeling_lsg_pegasus.py")
assert os.path.isfile(path)
import torch, transformers  # noqa: F401
PY
}

if check; then
  echo "[setup_env] $VENV already set up"
  exit 0
fi

echo "[setup_env] creating $VENV"
rm -rf "$VENV"
python3 -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# ONE pip call, torch pinned in the same call: otherwise the resolver pulls the CUDA build.
"$PY" -m pip install \
  "torch==2.13.0" "transformers==4.47.1" "lsg-converter==0.1.9" \
  sentencepiece numpy safetensors

if check; then
  echo "[setup_env] OK"
else
  echo "[setup_env] environment check failed" >&2
  exit 1
fi
