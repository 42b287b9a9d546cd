"""The GPU issue's script (benchmarks/gpu_check.py) runs end to end on the CPU provider, on tiny sizes.

The runtime's decoder driver is one code path for CPU and CUDA, so this dry run exercises what the GPU
run will: every phase must finish without an error and report what the GPU issue asks for.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_runs_every_phase_on_the_cpu_provider(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.py"
    cmd = [sys.executable, str(script), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    done = subprocess.run([*cmd, "--provider", "cpu", "--quick"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    phases = report["phases"]
    assert not [name for name, phase in phases.items() if "error" in phase], phases
    assert phases["parity"]["all_equal"] is True
    copies = phases["copies"]
    assert copies["steps"] == 16 and set(copies["driver_transfers_per_step"]) >= {"update_inplace", "numpy"}
    systems = {row["system"] for row in phases["speed"]["rows"]}
    assert systems == {"ortseq-fp32", "ortseq-fp16", "ortseq-int4", "transformers-fp32"}
    # timed on a tiny model, a per-step time is a difference of two short medians: only its presence is
    # checked here (on a busy machine it can come out negative); the GPU run reads its value
    assert all(math.isfinite(row["per_step_ms"]) and row["floor_ms"] > 0 for row in phases["speed"]["rows"])
    assert set(phases["lsg"]["rows"]) == {"ortseq-lsg", "torch-full-attention"}
