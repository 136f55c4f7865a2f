"""Regenerate benchmarks/RESULTS.md from every JSON file in benchmarks/out.

    python benchmarks/report.py                      # benchmarks/out -> benchmarks/RESULTS.md
    python benchmarks/report.py --out-dir DIR --results FILE

One section per JSON file. Files this script knows (speed.json, recall_*.json, speed_vectors.json,
starter_quality.json) get tables made for them; any other shape (fusion_*.json, a decode benchmark, whatever
comes next) is rendered generically: scalars as a key/value table, lists of flat objects as tables, nested
objects as sub-sections. PNG files in the folder are linked. The machine is named at the top (CPU model from
/proc/cpuinfo, cores, RAM, torch / faiss / open_clip versions, GPU if any).

Light: imports only the standard library until it renders (then numpy-free); torch and faiss versions are read
from package metadata, so this runs in a second.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "out"
DEFAULT_RESULTS = ROOT / "benchmarks" / "RESULTS.md"
REPRO = "python benchmarks/report.py"

GPU_NOTE = (
    "No GPU on this machine: the bf16 ViT-B-32 GPU throughput run was not possible here. On a CUDA machine run "
    "`python benchmarks/speed.py --device cuda --precision bf16 --parts indexing --models ViT-B-32:none` "
    "(the indexing pipeline uses bf16 autocast on CUDA by default)."
)


# ------------------------------------------------------------------------------------------------------------
# machine


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def machine_info() -> dict:
    """CPU model, cores, RAM, GPU and library versions of this machine (cheap: no torch import)."""
    cpu = None
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                ram = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    gpu = None
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            gpu = "; ".join(s.strip() for s in out.stdout.strip().splitlines())
    except Exception:
        gpu = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "ram_gib": ram,
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "faiss": _version("faiss-cpu") or _version("faiss-gpu") or _version("faiss"),
        "open_clip": _version("open_clip_torch"),
        "numpy": _version("numpy"),
        "loadavg": load,
    }


def machine_line(m: dict) -> str:
    gpu = m.get("gpu") or "no GPU"
    return (
        f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB RAM, {gpu}; "
        f"torch {m.get('torch')}, faiss {m.get('faiss')}, open_clip {m.get('open_clip')}, "
        f"Python {m.get('python')}"
    )


# ------------------------------------------------------------------------------------------------------------
# generic rendering


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.2f}"
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, (list, tuple)) and all(not isinstance(x, (dict, list)) for x in v):
        s = ", ".join(_fmt(x) for x in v)
        return s if len(s) <= 120 else s[:117] + "…"
    if isinstance(v, (dict, list)):
        s = json.dumps(v, ensure_ascii=False)
        return s if len(s) <= 120 else s[:117] + "…"
    s = str(v).replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= 200 else s[:197] + "…"


def table(rows: list[dict], cols: list[str] | None = None, headers: dict | None = None) -> str:
    if not rows:
        return "(none)\n"
    if cols is None:
        cols = []
        for r in rows:
            for k, v in r.items():
                if (
                    k not in cols
                    and not isinstance(v, (dict,))
                    and not (isinstance(v, list) and v and isinstance(v[0], dict))
                ):
                    cols.append(k)
    headers = headers or {}
    out = ["| " + " | ".join(headers.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(_get(r, c)) for c in cols) + " |")
    return "\n".join(out) + "\n"


def _get(d: dict, dotted: str):
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def render_generic(obj, level: int = 3, max_rows: int = 60) -> str:
    """Any JSON: scalars as a key/value table, lists of objects as tables, nested objects as sub-sections."""
    parts: list[str] = []
    if isinstance(obj, dict):
        scalars = {
            k: v
            for k, v in obj.items()
            if not isinstance(v, (dict, list))
            or (isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v))
        }
        if scalars:
            parts.append("| key | value |\n|---|---|\n" + "".join(f"| {k} | {_fmt(v)} |\n" for k, v in scalars.items()))
        for k, v in obj.items():
            if k in scalars:
                continue
            parts.append(f"{'#' * min(level, 6)} {k}\n")
            parts.append(render_generic(v, level + 1, max_rows))
    elif isinstance(obj, list):
        if obj and all(isinstance(x, dict) for x in obj):
            shown = obj[:max_rows]
            parts.append(table(shown))
            if len(obj) > max_rows:
                parts.append(f"\n({len(obj) - max_rows} more rows in the JSON)\n")
        else:
            parts.append(_fmt(obj) + "\n")
    else:
        parts.append(_fmt(obj) + "\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------------
# known files


def render_speed(d: dict) -> str:
    parts = []
    cmds = {k: [v] if isinstance(v, str) else list(v) for k, v in (d.get("commands") or {}).items()}
    if len({c for v in cmds.values() for c in v}) > 1:
        parts.append(
            "Reproduce (parts were run separately and merged):\n\n"
            + "".join(f"- {k}: " + "; ".join(f"`{c}`" for c in v) + "\n" for k, v in cmds.items())
        )
    elif d.get("command"):
        parts.append(f"Reproduce: `{d['command']}`\n")
    if d.get("machine"):
        parts.append(
            f"Measured on: {machine_line(d['machine'])}; load average at start "
            f"{_fmt(d['machine'].get('loadavg'))} (the machine is shared: treat small differences as noise).\n"
        )
    idx = d.get("indexing") or []
    if idx:
        parts.append("#### Indexing throughput (end to end through `run_index`)\n")
        parts.append(
            f"{idx[0].get('n_images')} generated {idx[0].get('image_size', '1600x1200')} JPEGs "
            f"(quality 90, photographic-looking; mean {_fmt(idx[0].get('jpeg_mean_kb'))} KB). End to end = scan "
            f"+ hash + "
            "decode (worker processes) + encode + SQLite + FAISS publish, wall clock, model load included; "
            "'excl. load' subtracts the model load measured in the same process. Model-only = "
            "`encode_image_tensors` on preprocessed batches. Decode-only = `decode_stream` with the same workers. "
            "Torch threads: torch's default (2 here) or 1 (`--torch-threads`); which wins depends on what else runs: "
            "with the machine to itself 2 threads win, while another process holds a core 2 threads lose badly "
            "(see the load average per row in the JSON).\n"
        )
        parts.append(
            table(
                idx,
                [
                    "model",
                    "device",
                    "precision",
                    "batch_size",
                    "workers",
                    "torch_threads",
                    "images_per_s",
                    "images_per_s_excl_load",
                    "model_only_images_per_s",
                    "decode_only_images_per_s",
                    "model_load_s",
                    "wall_s",
                    "rerun_unchanged_s",
                    "peak_rss_mb",
                ],
                {
                    "images_per_s": "end-to-end img/s",
                    "images_per_s_excl_load": "img/s excl. load",
                    "model_only_images_per_s": "model-only img/s",
                    "decode_only_images_per_s": "decode-only img/s",
                    "model_load_s": "model load s",
                    "wall_s": "wall s",
                    "rerun_unchanged_s": "unchanged re-run s",
                    "peak_rss_mb": "peak RSS MB",
                    "batch_size": "batch",
                    "workers": "decode workers",
                    "torch_threads": "torch threads",
                },
            )
        )
    rr = d.get("rerun")
    if rr:
        parts.append("#### Unchanged re-run\n")
        parts.append(
            f"{_fmt(rr.get('files'))} small JPEGs indexed once with {rr.get('model')}, then `run_index` on the "
            "same folder again with nothing changed (scan + stat compare + sidecar check + vector sync; "
            "the model is still loaded).\n"
        )
        parts.append(
            table(
                [rr],
                ["files", "first_index_s", "rerun_unchanged_s", "rerun_runs_s", "scan_only_s", "model_load_s"],
                {
                    "first_index_s": "first index s",
                    "rerun_unchanged_s": "unchanged re-run s (median)",
                    "rerun_runs_s": "runs",
                    "scan_only_s": "scan only s",
                    "model_load_s": "model load s",
                },
            )
        )
    lat = d.get("latency") or []
    if lat:
        parts.append("#### Query latency through the Searcher\n")
        parts.append(
            "Synthetic CLIP-like vectors (speed_vectors.make_vectors) written into a real index (SQLite rows "
            "+ raw embeddings, vectors published by `Index.sync_vectors`), queried in a fresh process with "
            f"{lat[0].get('model')}. Text/image end to end = `Searcher.search` (encode + fusion + FAISS + "
            "SQLite join), k=10, warm; 'search+join' = `search_vector` without the encoder; recall@10 vs "
            "exact on held-out text-like synthetic queries. Engine default parameters per kind.\n"
        )
        parts.append(
            table(
                lat,
                [
                    "size",
                    "kind",
                    "params",
                    "text_export",
                    "text_p50_ms",
                    "text_p95_ms",
                    "image_p50_ms",
                    "image_p95_ms",
                    "image_p50_ms_1_torch_thread",
                    "encode_text_p50_ms",
                    "search_join_p50_ms",
                    "search_join_p95_ms",
                    "recall_at_10",
                    "first_query_s",
                    "bytes_per_vector",
                    "sqlite_bytes_per_image",
                    "build_s",
                    "build_peak_rss_mb",
                    "query_peak_rss_mb",
                ],
                {
                    "text_p50_ms": "text p50 ms",
                    "text_p95_ms": "text p95 ms",
                    "image_p50_ms": "image p50 ms",
                    "image_p95_ms": "image p95 ms",
                    "image_p50_ms_1_torch_thread": "image p50 ms (1 torch thread)",
                    "encode_text_p50_ms": "text encode p50 ms",
                    "search_join_p50_ms": "search+join p50 ms",
                    "search_join_p95_ms": "search+join p95 ms",
                    "recall_at_10": "recall@10 vs exact",
                    "first_query_s": "first query s (model load)",
                    "bytes_per_vector": "FAISS B/vec",
                    "sqlite_bytes_per_image": "SQLite B/image",
                    "build_s": "build s",
                    "build_peak_rss_mb": "build peak RSS MB",
                    "text_export": "torch-free text",
                    "query_peak_rss_mb": "query peak RSS MB",
                },
            )
        )
        parts.append(
            "Image queries run the torch image encoder with torch's default thread count (2 here) unless "
            "the column says 1 thread. On this shared machine, whenever another process holds a core, two "
            "OpenMP threads wait on each other at every op, and an image query takes 1-2 s instead of "
            "~0.1-0.15 s; the 1-thread column is the stable figure. Text queries use the index's "
            "ONNX export (retrieval/models/onnx_runtime.py) when 'torch-free text' says yes.\n"
        )
    cold = d.get("cold_cli")
    if cold:
        parts.append("#### Cold CLI search\n")
        parts.append(
            f"`{cold.get('command')}`: a new process each time, from start to printed results, on a "
            f"{_fmt(cold.get('size'))}-vector {cold.get('kind')} index (synthetic vectors, "
            f"{cold.get('model')} identity); median of {cold.get('runs')} runs. The OS page cache is warm "
            "(dropping it would disturb other users of this machine).\n"
        )
        parts.append(
            table(
                [cold],
                ["search_median_s", "search_runs_s", "info_median_s"],
                {"search_median_s": "search median s", "search_runs_s": "runs s", "info_median_s": "`info` median s"},
            )
        )
        if cold.get("breakdown"):
            parts.append("Where the time goes (one fresh process, stage by stage):\n")
            bd = cold["breakdown"]
            parts.append(
                table(
                    [
                        {"stage": k, "seconds": v}
                        for k, v in bd.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)
                    ]
                )
            )
            if "torch imported" in bd:
                parts.append(f"torch imported by the query: {_fmt(bd['torch imported'])}\n")
    for png in d.get("plots") or []:
        parts.append(f"![{Path(png).stem}]({_rel_png(png)})\n")
    if d.get("gpu_note"):
        parts.append(f"_{d['gpu_note']}_\n")
    return "\n".join(parts)


def render_recall(d: dict) -> str:
    parts = []
    if d.get("command"):
        parts.append(f"Reproduce: `{d['command']}`\n")
    if d.get("dataset"):
        parts.append(f"Dataset: {d['dataset']}\n")
    runs = d.get("runs") if isinstance(d.get("runs"), list) else [d]
    rows = []
    for r in runs:
        ks = r.get("k") or [1, 5, 10]
        row = {
            "model": r.get("model"),
            "index": r.get("index_type"),
            "fusion": r.get("fusion"),
            "images": r.get("n_images"),
            "captions": r.get("n_captions"),
        }
        for k in ks:
            row[f"t2i R@{k}"] = _pct(r.get(f"image_retrieval_recall@{k}"))
        for k in ks:
            row[f"i2t R@{k}"] = _pct(r.get(f"text_retrieval_recall@{k}"))
        if isinstance(r.get("exact"), dict):
            for k in ks:
                row[f"exact t2i R@{k}"] = _pct(r["exact"].get(f"image_retrieval_recall@{k}"))
            for k in ks:
                row[f"exact i2t R@{k}"] = _pct(r["exact"].get(f"text_retrieval_recall@{k}"))
        row["eval s"] = r.get("eval_seconds")
        rows.append(row)
    parts.append(
        "Recall in % (t2i = `image_retrieval_recall@K`, text→image; i2t = `text_retrieval_recall@K`, "
        "image→text), measured through the engine's query path (`retrieval benchmark recall`).\n"
    )
    parts.append(table(rows))
    if d.get("note"):
        parts.append(f"_{d['note']}_\n")
    return "\n".join(parts)


def _pct(v):
    return None if v is None else round(100 * float(v), 2)


def render_speed_vectors(d: dict) -> str:
    parts = []
    if d.get("command"):
        parts.append(f"Reproduce: `{d['command']}`\n")
    parts.append(
        f"Vector layer only (no encoder, no SQLite): faiss {d.get('faiss_version')}, k={d.get('k')}, "
        f"{d.get('queries')} queries, target recall {d.get('target_recall')}. Written by "
        "benchmarks/speed_vectors.py; the columns are its own.\n"
    )
    try:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import speed_vectors  # noqa: PLC0415

        parts.append(speed_vectors.fmt_table(d.get("results") or []) + "\n")
    except Exception:
        rows = [
            {
                "size": r.get("size"),
                "kind": r.get("kind"),
                "build_s": r.get("build_s"),
                "bytes_per_vector": r.get("bytes_per_vector"),
                "p50_ms": _get(r, "tuned.p50_ms"),
                "p95_ms": _get(r, "tuned.p95_ms"),
                "recall_at_10": _get(r, "tuned.recall_at_10"),
                "peak_rss_mb": r.get("peak_rss_mb"),
            }
            for r in d.get("results") or []
        ]
        parts.append(table(rows))
    for png in d.get("plots") or []:
        parts.append(f"![{Path(png).stem}]({_rel_png(png)})\n")
    return "\n".join(parts)


def render_starter(d: dict) -> str:
    parts = []
    if d.get("reproduce"):
        parts.append(f"Reproduce: `{d['reproduce']}`\n")
    cs = d.get("check_set") or {}
    parts.append(
        f"Check set: {cs.get('photos')} photos, {cs.get('captions')} captions ({cs.get('source')}). "
        f"Machine: {d.get('machine')}.\n"
    )
    m = d.get("default_metrics_encode_images") or {}
    if m:
        parts.append("Shipped configuration, through `encode_images` (recall in %):\n")
        parts.append(table([{k: (_pct(v) if isinstance(v, float) and v <= 1 else v) for k, v in m.items()}]))
    if d.get("speed"):
        parts.append("Speed:\n")
        parts.append(render_generic(d["speed"], 5))
    rest = {
        k: v
        for k, v in d.items()
        if k not in ("sweep", "speed", "default_metrics_encode_images", "reproduce", "check_set", "machine")
    }
    parts.append("<details><summary>Everything else in the file (the full sweep is in the JSON)</summary>\n")
    parts.append(render_generic(rest, 5))
    parts.append("</details>\n")
    return "\n".join(parts)


def _rel_png(png: str) -> str:
    p = Path(png)
    return f"out/{p.name}"


def _sibling_md(path: Path):
    """Renderer for results whose script writes its own Markdown beside the JSON: that file, headings demoted."""

    def render(d: dict) -> str:
        md = path.with_suffix(".md")
        body = md.read_text() if md.is_file() else ""
        if not body:
            raise ValueError("no Markdown beside the JSON")
        lines = [("#" + ln if ln.startswith("#") else ln) for ln in body.splitlines() if not ln.startswith("# ")]
        return "\n".join(lines).strip() + "\n"

    return render


RENDERERS = [
    (lambda name, d: name.startswith("rclip_peer"), "The engine against rclip (rclip_peer.py)", None),
    (
        lambda name, d: name.startswith("pg_vectors"),
        "PostgreSQL + pgvector against the embedded store (pg_vectors.py)",
        None,
    ),
    (
        lambda name, d: name.startswith("ray_pg_write"),
        "Ray into PostgreSQL: driver or actor writes (ray_pg_write.py)",
        None,
    ),
    (lambda name, d: name == "speed.json", "Speed: indexing, query latency, memory, cold CLI", render_speed),
    (lambda name, d: name.startswith("recall"), None, render_recall),
    (lambda name, d: name == "speed_vectors.json", "Vector index speed (speed_vectors.py)", render_speed_vectors),
    (lambda name, d: name == "starter_quality.json", "Starter model quality (starter_quality.py)", render_starter),
]


FAULTS_REPRODUCE = (
    "FAULTS_OUT=benchmarks/out python -m pytest -q tests/test_kill.py tests/test_concurrency.py tests/test_diskfull.py"
)


def render_file(path: Path) -> str:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"## {_title(path, None)}\n\n_Source: `benchmarks/out/{path.name}`_ (could not be read: {e})\n"
    for match, title, fn in RENDERERS:
        fn = fn or _sibling_md(path)
        try:
            if match(path.name, d) and isinstance(d, dict):
                return f"## {title or _title(path, d)}\n\n_Source: `benchmarks/out/{path.name}`_\n\n" + fn(d)
        except Exception as e:  # a file that looks known but is not: fall back to the generic view
            return (
                f"## {_title(path, d)}\n\n_Source: `benchmarks/out/{path.name}` (rendered generically: {e})_\n\n"
                + render_generic(d)
            )
    how = ""
    if path.name.startswith("faults_"):
        how = f"Reproduce: `{FAULTS_REPRODUCE}` (or `python benchmarks/run_all.py --only faults,report`)\n\n"
    elif path.name.startswith("malformed_"):
        how = "Reproduce: `python benchmarks/malformed_report.py`\n\n"
    return f"## {_title(path, d)}\n\n_Source: `benchmarks/out/{path.name}`_\n\n" + how + render_generic(d)


def _title(path: Path, d) -> str:
    if isinstance(d, dict) and isinstance(d.get("title"), str):
        return d["title"]
    stem = path.stem.replace("_", " ")
    return stem[:1].upper() + stem[1:]


ORDER = ["speed.json", "recall", "speed_vectors.json", "starter_quality.json", "fusion", "decode", "run_all"]


def _order(p: Path):
    for i, prefix in enumerate(ORDER):
        if p.name.startswith(prefix.replace(".json", "")) and (not prefix.endswith(".json") or p.name == prefix):
            return (i, p.name)
    return (len(ORDER), p.name)


def headline(out_dir: Path) -> str:
    """A few numbers up front, when the files that hold them exist."""
    lines = []
    sp = out_dir / "speed.json"
    if sp.exists():
        try:
            d = json.loads(sp.read_text())
            for r in d.get("indexing") or []:
                lines.append(
                    f"- Indexing {r.get('n_images')} {r.get('image_size', '1600x1200')} JPEGs with `{r['model']}` "
                    f"({r.get('device')}, torch threads: {r.get('torch_threads')}): "
                    f"**{_fmt(r.get('images_per_s'))} images/s** end to end "
                    f"({_fmt(r.get('images_per_s_excl_load'))} excluding the model load); model only "
                    f"{_fmt(r.get('model_only_images_per_s'))} images/s; decode only "
                    f"{_fmt(r.get('decode_only_images_per_s'))} images/s."
                )
            if d.get("rerun"):
                rr = d["rerun"]
                lines.append(
                    f"- Unchanged re-run over {_fmt(rr.get('files'))} files: **{_fmt(rr.get('rerun_unchanged_s'))} s**."
                )
            if d.get("cold_cli"):
                c = d["cold_cli"]
                lines.append(
                    f"- Cold `search` on a {_fmt(c.get('size'))}-vector {c.get('kind')} index: "
                    f"**{_fmt(c.get('search_median_s'))} s** median from process start to printed results."
                )
            for r in d.get("latency") or []:
                if r.get("size") == max(x.get("size", 0) for x in d["latency"]):
                    lines.append(
                        f"- {r['kind']} at {_fmt(r['size'])} vectors: text query p50 {_fmt(r.get('text_p50_ms'))} ms "
                        f"end to end (search+join {_fmt(r.get('search_join_p50_ms'))} ms, recall@10 vs exact "
                        f"{_fmt(r.get('recall_at_10'))})."
                    )
        except Exception:
            pass
    for p in sorted(out_dir.glob("cold_query*.json")):
        try:
            d = json.loads(p.read_text())
            for w in d.get("warm") or []:
                if w.get("mode") == "fast" and w.get("n_vectors", 0) >= 100_000:
                    lines.append(
                        f"- Warm text query, numpy text encoder ({p.stem}), {_fmt(w['n_vectors'])} vectors, "
                        f"{w.get('index_kind')}: **p50 {_fmt(w.get('total_p50_ms'))} ms** end to end (encode "
                        f"{_fmt(w.get('encode_p50_ms'))} ms, FAISS + SQLite {_fmt(w.get('search_join_p50_ms'))} ms), "
                        f"recall@10 vs exact {_fmt(w.get('recall_at_10'))}."
                    )
        except Exception:
            pass
    for p in sorted(out_dir.glob("recall*.json")):
        try:
            d = json.loads(p.read_text())
            for r in d.get("runs") if isinstance(d.get("runs"), list) else [d]:
                if "image_retrieval_recall@1" in r:
                    lines.append(
                        f"- Recall ({p.stem}, `{r.get('model')}`, {r.get('n_images')} images): text→image R@1 "
                        f"{_pct(r['image_retrieval_recall@1'])}%, image→text R@1 "
                        f"{_pct(r.get('text_retrieval_recall@1'))}%."
                    )
        except Exception:
            pass
    lines += _onnx_before_after(out_dir)
    return "\n".join(lines)


def _quietest(out_dir: Path, stem: str) -> Path:
    """`<stem>_idle.json` (the run taken with little else on the machine) when there is one, else `<stem>.json`."""
    idle = out_dir / f"{stem}_idle.json"
    return idle if idle.is_file() else out_dir / f"{stem}.json"


# The runs the ONNX before/after table is taken from: the newest side-by-side runs, all on one machine
# (RESULTS_onnx.md, "Plain attention, pre-optimised graphs"); older runs stay in out/ and in RESULTS_onnx.md.
ONNX_RUNS = {"rclip_peer": "rclip_peer_v6", "onnx_warm_1m": "onnx_warm_1m_v5", "onnx_index": "onnx_index_v5"}


def _onnx_run(out_dir: Path, stem: str) -> Path:
    chosen = out_dir / f"{ONNX_RUNS.get(stem, stem)}.json"
    return chosen if chosen.is_file() else _quietest(out_dir, stem)


def _onnx_index(out_dir: Path) -> dict:
    """The chosen onnx_index run's "index" section, or {} when there is none."""
    try:
        return json.loads(_onnx_run(out_dir, "onnx_index").read_text())["index"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _torch_indexing(out_dir: Path, onnx_index: dict) -> tuple[float | None, str]:
    """ViT-B-32 torch indexing images/s: onnx_index's torch runs (same machine and rounds as its onnx runs), else
    speed.json's."""
    r = (onnx_index.get("runs") or {}).get("torch default")
    if r:
        return r["images_per_s"], "onnx_index's interleaved torch runs"
    try:
        return next(
            r["images_per_s"]
            for r in json.loads((out_dir / "speed.json").read_text()).get("indexing") or []
            if r.get("model") == "ViT-B-32:none" and r.get("torch_threads") == 2
        ), "speed.json's, taken on another day"
    except (OSError, ValueError, StopIteration, KeyError):
        return None, ""


def _onnx_before_after(out_dir: Path) -> list[str]:
    """Torch (before) against onnxruntime (after) on the issue's figures, from onnx_index or speed.json (torch
    indexing), rclip_peer (indexing and cold queries beside rclip) and onnx_warm_1m (warm 1M text query)."""
    peer_path = _onnx_run(out_dir, "rclip_peer")
    try:
        peer = json.loads(peer_path.read_text())
    except (OSError, ValueError):
        return []
    rows = []
    onnx_index = _onnx_index(out_dir)
    index_runs = onnx_index.get("runs") or {}
    torch_ix, torch_src = _torch_indexing(out_dir, onnx_index)
    ix = peer["summary"]["index"]
    rc = ix.get("rclip")
    # onnx_index's onnxruntime runs, interleaved with the torch runs the ratio is taken against
    b32 = index_runs.get("onnx default") or ix.get("engine ViT-B-32")
    rc_ix = f"{_fmt(rc['images_per_s'])} images/s ({PEER_ARCH})" if rc else ""
    if b32:
        ok = torch_ix and b32["images_per_s"] >= 1.8 * torch_ix
        target = f">= {_fmt(1.8 * torch_ix)} (1.8x): {'met' if ok else 'missed'}" if torch_ix else ">= 1.8x torch"
        ratio = f" ({b32['images_per_s'] / torch_ix:.2f}x)" if torch_ix else ""
        rows.append(
            f"| `index`, {peer['n']} 1600x1200 JPEGs, ViT-B-32, images/s | {_fmt(torch_ix) if torch_ix else ''} | "
            f"**{_fmt(b32['images_per_s'])}**{ratio} | {target} | {rc_ix} |"
        )
    bf, fp = index_runs.get("torch-bf16 default"), index_runs.get("torch default")
    if bf and fp:  # the opt-in --precision bf16 (torch over bfloat16 weights), beside the same run's torch fp32
        q = onnx_index.get("bf16_vs_fp32") or {}
        ratio = bf["images_per_s"] / fp["images_per_s"]
        rows.append(
            f"| `index --precision bf16`, {onnx_index.get('images', '')} JPEGs, ViT-B-32, images/s (vectors within "
            f"{q.get('max_abs_diff', float('nan')):.0e} of fp32) | {_fmt(fp['images_per_s'])} | "
            f"**{_fmt(bf['images_per_s'])}** ({ratio:.2f}x) | >= 1.8x: {'met' if ratio >= 1.8 else 'missed'} | |"
        )
    if ix.get("engine") and rc:
        rows.append(
            f"| `index`, same photos, {PEER_ARCH} (rclip's model), images/s | | "
            f"**{_fmt(ix['engine']['images_per_s'])}** | >= rclip: "
            f"{'met' if ix['engine']['images_per_s'] >= rc['images_per_s'] else 'missed'} | "
            f"{_fmt(rc['images_per_s'])} |"
        )
    for what, v in peer["summary"]["query"].items():
        if "engine" in v and "rclip" in v:
            lim = 0.6 if what.startswith("image") else 0.25
            ok = "met" if v["engine"]["median_s"] <= lim else "missed"
            target = f"<= {lim} s: {ok}" if "rows" in what else ""
            rows.append(
                f"| cold `search`, {what} ({PEER_ARCH}), median | | **{_fmt(v['engine']['median_s'])} s** | "
                f"{target} | {_fmt(v['rclip']['median_s'])} s |"
            )
    try:
        warm_path = _onnx_run(out_dir, "onnx_warm_1m")
        w = json.loads(warm_path.read_text())
        for r in w.get("warm") or []:
            if r.get("mode") == "fast" and r.get("n_vectors", 0) >= 1_000_000:
                rows.append(
                    f"| warm text query, {_fmt(r['n_vectors'])} vectors, {r.get('index_kind')} ({warm_path.stem}) | | "
                    f"**p50 {_fmt(r['total_p50_ms'])} ms**, recall@10 {_fmt(r['recall_at_10'])} | "
                    "p50 <= 15 ms at recall@10 >= 0.98: "
                    f"{'met' if r['total_p50_ms'] <= 15 and r['recall_at_10'] >= 0.98 else 'missed'} | |"
                )
    except (OSError, ValueError, KeyError):
        pass
    if not rows:
        return []
    loads = [r["load_avg"][0] for r in peer.get("runs", []) if r.get("load_avg")]
    note = f"load average {min(loads):.1f}–{max(loads):.1f}" if loads else "load not recorded"
    return [
        "",
        f"Before / after ONNX Runtime on the CPU ({note} during {peer_path.stem}; the torch indexing figure is "
        f"{torch_src}; see RESULTS_onnx.md):",
        "",
        "| | before (torch) | after (onnxruntime) | target | rclip " + peer.get("rclip", {}).get("version", "") + " |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


PEER_ARCH = "ViT-B-32-256"


def build_report(out_dir: Path) -> str:
    m = machine_info()
    files = sorted(out_dir.glob("*.json"), key=_order) if out_dir.is_dir() else []
    parts = [
        "# Benchmark results\n",
        f"_Generated by `{REPRO}` from the {len(files)} JSON files in `benchmarks/out/`; do not edit by hand. "
        f"Regenerated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}._\n",
        f"**Machine of this regeneration:** {machine_line(m)}. {m.get('cores_usable') or m.get('cores')} usable "
        "cores. The runs come from 2-core machines of this project over time (an Intel Xeon, AMD EPYCs); each JSON "
        "file records its own, and only figures of one run or one section compare. Each section says how its numbers "
        "were taken; figures are medians unless noted.\n",
    ]
    if not m.get("gpu"):
        parts.append(f"**GPU:** {GPU_NOTE}\n")
    notes = sorted(Path(__file__).resolve().parent.glob("RESULTS_*.md"))
    if notes:
        parts.append("**Notes by topic:** " + ", ".join(f"[{p.name}]({p.name})" for p in notes) + ".\n")
    head = headline(out_dir)
    if head:
        parts.append("## Headline figures\n\n" + head + "\n")
    texts = [
        p for p in (sorted(out_dir.glob("*.txt")) if out_dir.is_dir() else []) if p.stem not in {f.stem for f in files}
    ]
    parts.append("## Contents\n\n" + "".join(f"- `{p.name}`\n" for p in files + texts))
    for p in files:
        parts.append(render_file(p))
    json_stems = {p.stem for p in files}
    for txt in sorted(out_dir.glob("*.txt")) if out_dir.is_dir() else []:
        if txt.stem in json_stems:
            continue
        body = txt.read_text(errors="replace").rstrip()
        if len(body) > 20000:
            body = body[:20000] + "\n… (cut; the whole output is in the file)"
        parts.append(
            f"## {_title(txt, None)} (text output)\n\n_Source: `benchmarks/out/{txt.name}`_\n\n```\n{body}\n```\n"
        )
    pngs = sorted(out_dir.glob("*.png")) if out_dir.is_dir() else []
    linked = "\n".join(parts)
    rest = [p for p in pngs if f"out/{p.name}" not in linked]
    if rest:
        parts.append("## Other plots\n\n" + "".join(f"![{p.stem}](out/{p.name})\n\n" for p in rest))
    return "\n".join(parts).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(DEFAULT_OUT), help="folder of JSON results (default benchmarks/out)")
    ap.add_argument(
        "--results",
        default=None,
        help="Markdown file to write (default benchmarks/RESULTS.md, or "
        "RESULTS.md next to --out-dir when that is given)",
    )
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.results:
        results = Path(args.results)
    elif out_dir.resolve() == DEFAULT_OUT.resolve():
        results = DEFAULT_RESULTS
    else:
        results = out_dir.parent / "RESULTS.md"
    text = build_report(out_dir)
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, results)
    print(f"wrote {results} ({len(text.splitlines())} lines from {out_dir})")
    cmd = REPRO + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    print(f"reproduce: {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
