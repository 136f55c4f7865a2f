"""benchmarks/speed.py, recall.py and report.py run end to end at tiny sizes (keys only, no timing asserts)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(args, timeout=600):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_smoke")
    o = root / "out"
    p = _run(
        [
            str(ROOT / "benchmarks" / "speed.py"),
            "--tiny",
            "--out",
            str(o),
            "--data",
            str(root / "data"),
            "--tmpdir",
            str(root),
        ]
    )
    assert "reproduce: python benchmarks/speed.py --tiny" in p.stdout
    p = _run(
        [
            str(ROOT / "benchmarks" / "recall.py"),
            "--synthetic",
            "12",
            "--models",
            "tiny-clip:none",
            "--exact",
            "--workers",
            "0",
            "--out",
            str(o),
        ]
    )
    assert "reproduce: python benchmarks/recall.py" in p.stdout
    return o


def test_speed_json_keys(out):
    d = json.loads((out / "speed.json").read_text())
    for key in ("command", "machine", "indexing", "rerun", "latency", "cold_cli", "k"):
        assert key in d, key
    for key in ("cpu", "cores", "ram_gib", "torch", "faiss"):
        assert key in d["machine"], key
    (r,) = d["indexing"]
    for key in (
        "model",
        "n_images",
        "image_size",
        "jpeg_mean_kb",
        "images_per_s",
        "images_per_s_excl_load",
        "model_only_images_per_s",
        "decode_only_images_per_s",
        "model_load_s",
        "wall_s",
        "rerun_unchanged_s",
        "peak_rss_mb",
        "device",
        "precision",
        "batch_size",
        "workers",
        "torch_threads",
    ):
        assert key in r, key
    assert r["model"] == "tiny-clip:none" and r["n_images"] == 6 and r["images_per_s"] > 0
    for key in ("files", "first_index_s", "rerun_unchanged_s", "scan_only_s"):
        assert key in d["rerun"], key
    assert d["rerun"]["files"] == 40
    assert {(x["size"], x["kind"]) for x in d["latency"]} == {(2000, "flat"), (2000, "hnsw")}
    for x in d["latency"]:
        for key in (
            "text_p50_ms",
            "text_p95_ms",
            "image_p50_ms",
            "image_p95_ms",
            "encode_text_p50_ms",
            "search_join_p50_ms",
            "search_join_p95_ms",
            "recall_at_10",
            "bytes_per_vector",
            "sqlite_bytes_per_image",
            "build_s",
            "build_peak_rss_mb",
            "query_peak_rss_mb",
            "first_query_s",
        ):
            assert key in x, key
        assert 0.0 <= x["recall_at_10"] <= 1.0
    assert next(x for x in d["latency"] if x["kind"] == "flat")["recall_at_10"] == 1.0
    c = d["cold_cli"]
    for key in ("search_median_s", "search_runs_s", "info_median_s", "size", "kind", "breakdown", "command"):
        assert key in c, key
    assert c["size"] == 2000 and len(c["search_runs_s"]) == 1
    for png in d["plots"]:
        assert Path(png).is_file()


def test_recall_json_keys(out):
    d = json.loads((out / "recall_synthetic12.json").read_text())
    (r,) = d["runs"]
    for k in (1, 5, 10):
        assert f"image_retrieval_recall@{k}" in r and f"text_retrieval_recall@{k}" in r
        assert f"image_retrieval_recall@{k}" in r["exact"]
    assert r["n_images"] == 12 and r["n_captions"] == 24 and r["model"] == "tiny-clip:none"
    assert "command" in d and "machine" in d


def test_report(out, tmp_path):
    o = tmp_path / "out"
    shutil.copytree(out, o)
    (o / "fusion_weird.json").write_text(
        json.dumps(
            {"model": "x", "table": [{"a": 1, "b": 0.5}, {"a": 2, "b": None}], "nested": {"deep": {"v": [1, 2, 3]}}}
        )
    )
    (o / "bench_decode.txt").write_text("decode-only workers=1 fork   42.0 img/s\n")
    (o / "broken.json").write_text("{not json")
    peer = {
        "n": 10,
        "rclip": {"version": "3.3.0"},
        "runs": [{"load_avg": [1.5, 1.0, 0.5]}],
        "summary": {
            "index": {
                "engine ViT-B-32": {"images_per_s": 31.0},
                "engine": {"images_per_s": 25.0},
                "rclip": {"images_per_s": 20.0},
            },
            "query": {"text, 100,000 rows": {"engine": {"median_s": 0.3}, "rclip": {"median_s": 0.9}}},
        },
    }
    (o / "rclip_peer.json").write_text(json.dumps(peer))
    (o / "rclip_peer.md").write_text("# The engine against rclip\n\n## Indexing\n\n| tool | images/s |\n")
    results = tmp_path / "RESULTS.md"
    p = _run([str(ROOT / "benchmarks" / "report.py"), "--out-dir", str(o), "--results", str(results)], timeout=120)
    assert "reproduce: python benchmarks/report.py" in p.stdout
    text = results.read_text()
    assert text.startswith("# Benchmark results")
    assert "**Machine of this regeneration:**" in text and "GiB RAM" in text and "torch" in text and "faiss" in text
    for heading in (
        "## Speed: indexing, query latency, memory, cold CLI",
        "## Recall: synthetic12",
        "## Fusion weird",
        "## Bench decode (text output)",
        "## Broken",
        "## The engine against rclip (rclip_peer.py)",
        "### Indexing",
    ):
        assert heading in text, heading
    assert "image_retrieval_recall" in text and "| a | b |" in text and "42.0 img/s" in text
    assert "Before / after ONNX Runtime" in text
    assert (
        "| cold `search`, text, 100,000 rows (ViT-B-32-256), median | | **0.3 s** | <= 0.25 s: missed | 0.9 s |" in text
    )


def test_tokenizers_comparison_runs_and_both_reproduce_open_clip(tmp_path):
    p = _run(
        [str(ROOT / "benchmarks" / "tokenizers_vs_clip.py"), "--runs", "1", "--fuzz", "30", "--out", str(tmp_path)]
    )
    assert "reproduce: python benchmarks/tokenizers_vs_clip.py --runs 1 --fuzz 30" in p.stdout
    res = json.loads((tmp_path / "tokenizers_vs_clip.json").read_text())
    assert res["exactness"]["strings"] > 30
    assert res["exactness"]["mismatches"] == {"tokenizers": 0, "pure-python": 0}
    assert res["cold"]["same_ids"] is True
    assert set(res["cold"]["median_ms"]) == {"tokenizers", "pure-python"}
    assert (tmp_path / "tokenizers_vs_clip.md").is_file()
