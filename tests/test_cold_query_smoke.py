"""benchmarks/cold_query.py at a tiny size: the warm text modes (onnxruntime, and torch as before) run end to end
and write their JSON. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cold_query_quick_warm(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "cold_query.py"),
        "--quick",
        "--n",
        "3000",
        "--parts",
        "warm",
        "--skip-starter",
        "--modes",
        "fast,torch",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
        "--name",
        "smoke",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "reproduce: python benchmarks/cold_query.py" in p.stdout
    doc = json.loads((tmp_path / "out" / "smoke.json").read_text())
    warm = {w["mode"]: w for w in doc["warm"]}
    assert set(warm) == {"fast", "torch"}
    assert warm["fast"]["runtime"] == "onnx" and warm["torch"]["runtime"] == "torch"
    for mode, w in warm.items():
        assert w["queries"] == (30 if mode == "fast" else 20) and w["n_vectors"] == 3000 and w["index_kind"] == "flat"
        assert w["recall_at_10"] == 1.0  # flat is exact: the same query vector must find the same top 10
        assert w["total_p50_ms"] > 0
    assert (tmp_path / "out" / "smoke.md").read_text().count("| ViT-B-32:none, 3,000 |") == 2
