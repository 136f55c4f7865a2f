"""benchmarks/speed_vectors.py --tiny runs end to end and writes the expected JSON (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_speed_vectors_tiny(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed_vectors.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reproduce: python benchmarks/speed_vectors.py" in proc.stdout
    doc = json.loads((tmp_path / "speed_vectors.json").read_text())
    for key in ("machine", "faiss_version", "command", "k", "queries", "target_recall", "results"):
        assert key in doc
    assert {r["kind"] for r in doc["results"]} == {"flat", "hnsw", "ivfflat", "ivfsq", "ivfpq"}
    for r in doc["results"]:
        for key in (
            "size",
            "kind",
            "built_kind",
            "params",
            "build_s",
            "bytes_per_vector",
            "file_bytes",
            "load_ms",
            "load_mmap_ms",
            "peak_rss_mb",
            "index_rss_mb",
            "sweep",
            "tuned",
            "default_threads_p50_ms",
            "filtered",
            "batch_qps",
        ):
            assert key in r, key
        assert r["size"] == 2000 and r["dim"] == 32
        for key in ("recall_at_10", "p50_ms", "p95_ms"):
            assert key in r["tuned"]
        assert set(r["sweep"]) == {"text", "image"}
        f = r["filtered"]
        assert f["min_results"] == 10 and f["only_allowed"] is True
        assert 0.0 <= r["tuned"]["recall_at_10"] <= 1.0
    flat = next(r for r in doc["results"] if r["kind"] == "flat")
    assert flat["tuned"]["recall_at_10"] == 1.0
    assert (tmp_path / "speed_vectors.md").read_text().startswith("# Vector index speed")
    # the report has a section for it, from this run's JSON (not from committed figures)
    results = tmp_path / "RESULTS.md"
    report = [
        sys.executable,
        str(ROOT / "benchmarks" / "report.py"),
        "--out-dir",
        str(tmp_path),
        "--results",
        str(results),
    ]
    proc = subprocess.run(report, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "## Vector index speed" in results.read_text()
