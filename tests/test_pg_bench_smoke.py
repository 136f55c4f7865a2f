"""benchmarks/pg_vectors.py at a tiny size against a real server: both stores measured on the same queries, and
the PostgreSQL side finds what exact search finds."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_pg_vectors_tiny(tmp_path):
    import pg_vectors

    assert pg_vectors.main(["--tiny", "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "pg_vectors.json").read_text())
    by_store = {r["store"]: r for r in got["results"]}
    assert set(by_store) == {"postgresql", "embedded"}
    pg = by_store["postgresql"]
    # exact means exact even after many HNSW queries on the connection (prepared plans outlive settings)
    assert pg["exact"]["recall_at_10"] == 1.0 and pg["tuned"]["recall_at_10"] >= 0.9
    assert pg["filtered"]["only_allowed"] and pg["filtered"]["min_results"] == 10
    assert [p["ef_search"] for p in pg["sweep"]] == sorted(p["ef_search"] for p in pg["sweep"])
    assert "postgresql" in (tmp_path / "pg_vectors.md").read_text()
