"""benchmarks/duplicates.py --tiny runs end to end and writes its JSON and Markdown (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_duplicates_benchmark_tiny(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "duplicates.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reproduce: python benchmarks/duplicates.py --tiny" in proc.stdout
    r = json.loads((tmp_path / "duplicates.json").read_text())["result"]
    assert r["n"] == 2000 and r["groups_found"] >= 1
    assert r["planted_copies_recall"] == 1.0 and r["subset_ivf_pair_recall"] == 1.0  # easy at this size
    assert (tmp_path / "duplicates.md").read_text().startswith("# Near-duplicate grouping speed")
