"""Several writers on one PostgreSQL collection, a reader while they write, kills and database restarts.

(a) Three `cli.py index` processes at once (forks of the zygote, tests/faultkit.py) over overlapping folders
(A+B, B+C, C+A) into one new collection, while a reader process checks every snapshot it reads and every
search it makes (faultkit._pg_reader_main): afterwards every file has one row, one raw embedding per content,
one fused vector per row, each sidecar caption once, `verify` says ok and a search returns every file.
(b) A writer SIGKILLed in the middle of a batch, or inside the publish transaction, loses nothing committed;
the next run completes with no duplicates.
(c) The database restarted while a writer is paused mid-batch or inside the publish transaction: that run ends
with one line on stderr and exit code 2; the next run completes.
(d) Pruning unreferenced raw embeddings while another writer is about to reference one leaves it in place.
(e) serve answers 503 with one line while the database is down, and reconnects; a psycopg error escaping any
command is one line; many writers creating one new collection at once all succeed.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import faultkit as fk
import psycopg
from conftest import write_photos

from retrieval.store.pg.location import parse_location

SIDECAR = "sidecar caption {i}\nsecond line {i}\n"


def _folders(root: Path, n: int = 6) -> dict[str, list[Path]]:
    out = {}
    for k, name in enumerate("ABC"):
        out[name] = write_photos(root / name, n, start=100 * k)
        for p in out[name][:2]:  # two photos with sidecar captions in each folder
            Path(f"{p}.txt").write_text(SIDECAR.format(i=p.stem))
    return out


def _state(url: str) -> dict:
    """What the collection holds, read in one snapshot."""
    loc = parse_location(url)
    c = loc.collection
    with psycopg.connect(loc.dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")

        def one(sql):
            row = conn.execute(sql).fetchone()
            return None if row is None else row[0]

        return {
            "paths": sorted(bytes(r[0]).decode() for r in conn.execute(f"SELECT path_raw FROM {c}.images")),
            "rows": one(f"SELECT count(*) FROM {c}.images"),
            "hashes": one(f"SELECT count(DISTINCT hash) FROM {c}.images"),
            "image_embeddings": one(f"SELECT count(*) FROM {c}.embeddings WHERE kind = 'image'"),
            "text_embeddings": one(f"SELECT count(*) FROM {c}.embeddings WHERE kind = 'text'"),
            "texts": one(f"SELECT count(DISTINCT text_hash) FROM {c}.captions"),
            "captions": one(f"SELECT count(*) FROM {c}.captions"),
            "distinct_captions": one(f"SELECT count(DISTINCT (image_id, text)) FROM {c}.captions"),
            "vectors": one(f"SELECT count(*) FROM {c}.image_vectors"),
            "rows_with_vector": one(f"SELECT count(*) FROM {c}.images i JOIN {c}.image_vectors v ON v.id = i.id"),
            "caption_vectors": one(f"SELECT count(*) FROM {c}.caption_vectors"),
            "published": json.loads(one(f"SELECT value FROM {c}.manifest WHERE key = 'vectors_images'") or "0"),
        }


def _complete(url: str, files: list[Path], captions: int) -> None:
    """The full state: each file once with its embedding and vector, each caption once, verify ok, all found."""
    s = _state(url)
    assert s["paths"] == sorted(map(str, files)), s["paths"]
    assert s["rows"] == len(files) == s["hashes"] == s["image_embeddings"], s
    assert s["vectors"] == s["rows_with_vector"] == s["published"] == len(files), s
    assert s["captions"] == s["distinct_captions"] == s["caption_vectors"] == captions, s
    assert s["text_embeddings"] == s["texts"] == captions, s
    r = fk.zygote().start(["verify", "--index", url], Path(files[0]).parent.parent / "verify")
    assert r.wait() == 0 and r.stdout.strip() == "ok", (r.stdout, r.stderr)
    found = _search_all(url, len(files) + 5)
    assert found == sorted(map(str, files)), found


def _search_all(url: str, k: int) -> list[str]:
    from retrieval.query.searcher import Searcher

    with Searcher.open(url, device="cpu") as s:
        import numpy as np

        q = np.ones(s.index.dim, dtype=np.float32) / np.sqrt(s.index.dim)
        return sorted(h.path for h in s.search_vector(q, k=k, dedupe=False))


def _one_line_error(run: fk.Run, *needles: str) -> str:
    # the tiny test model's own warning (random weights) is open_clip's, not an error of the run
    lines = [x for x in run.stderr.splitlines() if x.strip() and "No pretrained weights loaded" not in x]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr and all(n in lines[0] for n in needles), lines
    return lines[0]


def _argv(paths, url, *extra, batch_size=2):
    # torch on the CPU: no ONNX export for the tiny model (three writers at once would each make one)
    argv = ["--index-type", "flat", "--runtime", "torch", *extra]
    return fk.index_argv(paths, url, *argv, batch_size=batch_size, workers=0)


def test_three_writers_over_overlapping_folders_and_a_reader(tmp_path, pg_url):
    f = _folders(tmp_path)
    files = [p for name in "ABC" for p in f[name]]
    reader, out, stop = fk.start_pg_reader(pg_url, tmp_path / "reader")
    runs = []
    try:
        # each batch of 2 takes at least 0.2 s, so the three runs overlap for several batches each
        env = fk.child_env(RETRIEVAL_FAULT="encode:1:sleep=0.2")
        z = fk.zygote()  # forks of a pre-imported `cli.py`, three running at once
        for pair in ("AB", "BC", "CA"):
            argv = _argv([tmp_path / x for x in pair], pg_url)
            runs.append(z.start_detached(argv, tmp_path / f"w{pair}", env=env))
        for r in runs:
            assert r.wait(180) == 0, r.stderr
            assert "Traceback" not in r.stderr and "error" not in r.stderr, r.stderr
        time.sleep(0.3)  # the reader sees the final state too
    finally:
        for r in runs:
            r.signal(signal.SIGKILL)
        stop.touch()
        reader.wait(60)
    summary = json.loads(out.read_text().splitlines()[-1])
    assert reader.returncode == 0 and summary["errors"] == 0, summary["first_error"]
    assert summary["violations"] == [], summary["violations"]
    # the reader watched the collection fill up: several states, searches, and the final one
    assert summary["states"] >= 3 and summary["searches"] >= 10, summary
    assert summary["last"][:2] == [len(files), len(files)], summary
    _complete(pg_url, files, captions=3 * 2 * 2)
    # a fourth run over everything finds nothing to do and adds nothing
    r = fk.start_cli(_argv([tmp_path / x for x in "ABC"], pg_url), tmp_path / "w4")
    assert r.wait(120) == 0, r.stderr
    assert _state(pg_url)["rows"] == len(files)


def test_kill_in_publish_and_mid_batch_loses_nothing_committed(tmp_path, pg_url):
    files = write_photos(tmp_path / "photos", 12)
    z = fk.zygote()
    argv = _argv([tmp_path / "photos"], pg_url, batch_size=4)
    # a publish after every batch, killed inside the second publish's transaction: batches 1-2 are committed,
    # the first publish (4 vectors) is kept, the second is rolled back whole
    r = z.start(
        argv,
        tmp_path / "k1",
        env=fk.child_env(RETRIEVAL_FAULT="publish:2:kill"),
        patch={"index_data.pipeline.CHECKPOINT_SECONDS": 0.0},
    )
    assert r.wait() == -signal.SIGKILL, r.stderr
    s = _state(pg_url)
    assert s["rows"] == s["image_embeddings"] == 8 and s["paths"] == sorted(map(str, files[:8])), s
    assert s["vectors"] == s["published"] == s["rows_with_vector"] == 4, s
    # killed after encoding its second batch, before that batch's transaction: its first batch is kept
    files += write_photos(tmp_path / "photos", 8, start=100)
    r = z.start(argv, tmp_path / "k2", env=fk.child_env(RETRIEVAL_FAULT="encode:2:kill"))
    assert r.wait() == -signal.SIGKILL, r.stderr
    s = _state(pg_url)
    assert s["rows"] == s["image_embeddings"] == 12 and s["vectors"] == s["published"] == 4, s
    r = z.start(argv, tmp_path / "k3")
    assert r.wait() == 0, r.stderr
    _complete(pg_url, files, captions=0)


def _pause(z, argv, workdir, rule, **kw) -> fk.Run:
    run = z.start(argv, workdir, env=fk.child_env(RETRIEVAL_FAULT=rule), **kw)
    deadline = time.monotonic() + 120
    while run.state() != "T" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert run.state() == "T", run.stderr
    return run


def test_database_restart_mid_run_is_one_line_and_the_next_run_completes(tmp_path, pg_server, pg_url):
    files = write_photos(tmp_path / "photos", 12)
    z = fk.zygote()
    argv = _argv([tmp_path / "photos"], pg_url, batch_size=4)
    for n, rule in enumerate(("encode:2:stop", "publish:1:stop")):  # mid-batch, then inside the publish
        run = _pause(z, argv, tmp_path / f"r{n}", rule)
        try:
            pg_server.restart()
        finally:
            run.signal(signal.SIGCONT)
        assert run.wait() == 2, run.stderr
        _one_line_error(run, "lost the connection to PostgreSQL", "what was committed is kept", "run the command again")
        s = _state(pg_url)
        assert s["rows"] == s["image_embeddings"] and s["vectors"] == s["published"], s
    assert _state(pg_url)["rows"] == 12  # the publish that was cut short had every row committed before it
    run = z.start(argv, tmp_path / "last")
    assert run.wait() == 0, run.stderr
    _complete(pg_url, files, captions=0)


def test_search_and_info_while_the_database_is_down_are_one_line(tmp_path, pg_server, pg_url):
    write_photos(tmp_path / "photos", 4)
    z = fk.zygote()
    assert z.start(_argv([tmp_path / "photos"], pg_url), tmp_path / "w").wait() == 0
    pg_server.stop()
    try:
        for argv in (["info", "--index", pg_url], ["search", "a photo", "--index", pg_url]):
            run = z.start(argv, tmp_path / "down")
            assert run.wait() == 2, run.stderr
            _one_line_error(run, "PostgreSQL at", "is it running?")
    finally:
        pg_server.start()


def test_prune_never_deletes_an_embedding_another_writer_is_about_to_use(tmp_path, pg_url):
    """Writer 1 finds a copy of an indexed photo and reuses its raw embedding (paused before its commit), while
    writer 2 sees the original deleted and prunes the embeddings no row references: the reused one stays, and
    is pruned only once no row uses it and nobody is writing."""
    photos = write_photos(tmp_path / "P", 3)
    z = fk.zygote()
    assert z.start(_argv([tmp_path / "P"], pg_url), tmp_path / "w0").wait() == 0
    (tmp_path / "Q").mkdir()
    shutil.copy(photos[0], tmp_path / "Q" / "copy.jpg")
    photos[0].unlink()
    first = _pause(z, _argv([tmp_path / "Q"], pg_url), tmp_path / "w1", "plan:1:stop")
    try:
        second = fk.start_cli(_argv([tmp_path / "P"], pg_url), tmp_path / "w2")  # deletes img_0000's row, prunes
        assert second.wait(120) == 0, second.stderr
    finally:
        first.signal(signal.SIGCONT)
    assert first.wait() == 0, first.stderr
    files = [tmp_path / "Q" / "copy.jpg", *photos[1:]]
    _complete(pg_url, files, captions=0)
    # with nobody else writing, a run that drops the last row of a content prunes its embedding
    (tmp_path / "Q" / "copy.jpg").unlink()
    assert z.start(_argv([tmp_path / "Q"], pg_url), tmp_path / "w3").wait() == 0
    s = _state(pg_url)
    assert s["rows"] == 2 and s["image_embeddings"] == 2, s


def test_serve_while_the_database_is_down_answers_503_and_reconnects(tmp_path, pg_server, pg_url):
    from fastapi.testclient import TestClient

    from retrieval.server.app import create_app

    write_photos(tmp_path / "photos", 4)
    assert fk.zygote().start(_argv([tmp_path / "photos"], pg_url), tmp_path / "w").wait() == 0
    with TestClient(create_app(pg_url, device="cpu", for_tests=True)) as client:
        assert client.get("/api/info").json()["images"] == 4
        image_id = client.get("/api/search", params={"id": 1}).json()["results"][0]["id"]
        pg_server.stop()
        try:
            for path, params in (("/api/info", None), ("/api/search", {"id": image_id}), ("/api/info", None)):
                r = client.get(path, params=params)
                assert r.status_code == 503, r.text
                message = r.json()["error"]
                assert "\n" not in message and "PostgreSQL at" in message, message
                assert "lost the connection" in message or "cannot reach" in message, message
        finally:
            pg_server.start()
        # the next requests reconnect: no restart of the server needed
        assert client.get("/api/info").json()["images"] == 4
        assert client.get("/api/search", params={"id": image_id}).json()["results"][0]["id"] == image_id


def test_a_psycopg_error_escaping_any_command_is_one_line(tmp_path, pg_url):
    """Cli.invoke maps what no command caught: a real connection ended under a command (its own backend
    terminated) gives one line and exit code 2; an embedded-store command never imports psycopg for it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from retrieval.cli import main\n"
        "from retrieval.store.pg.connect import connect\n"
        "from retrieval.store.pg.location import parse_location\n"
        "url = sys.argv[1]\n"
        "@main.command('drop-connection')\n"
        "def drop_connection():\n"
        "    conn = connect(parse_location(url), autocommit=True)\n"
        "    conn.execute('SELECT pg_terminate_backend(pg_backend_pid())')\n"
        "main(args=sys.argv[2:], prog_name='retrieval')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, pg_url, "drop-connection"], capture_output=True, text=True, cwd=fk.ROOT
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: lost the connection to PostgreSQL at ") and "Traceback" not in r.stderr
    check = "import sys\nfrom retrieval.cli import main\ntry:\n    main(args=sys.argv[1:])\nfinally:\n"
    check += "    print('psycopg' in sys.modules, file=sys.stderr)\n"
    r = subprocess.run(
        [sys.executable, "-c", check, "info", "--index", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        cwd=fk.ROOT,
        env=fk.child_env(),
    )
    assert r.returncode == 2 and r.stderr.strip().endswith("False"), r.stderr


def test_many_writers_opening_a_new_collection_at_once(pg_server):
    """Eight connections create the same new collection (and its vector tables) at the same moment, three
    times over: every one succeeds and the steps ran once."""
    import threading
    import uuid

    from pg_support import collection_url

    from retrieval.store.pg.index import PgIndex
    from retrieval.store.pg.schema import ensure_vector_tables

    for _ in range(3):
        collection = f"t_{uuid.uuid4().hex}"
        url = collection_url(pg_server.uri, collection)
        start, failures = threading.Barrier(8), []

        def open_one(url=url, collection=collection, start=start, failures=failures):
            try:
                start.wait()
                with PgIndex.open_for_write(url) as idx:
                    ensure_vector_tables(idx.store.db.pg, collection, 8)
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                failures.append(repr(e))

        threads = [threading.Thread(target=open_one) for _ in range(8)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert failures == [], failures
            with pg_server.admin() as conn:
                assert conn.execute(f"SELECT count(*) FROM {collection}.schema_version").fetchone() == (1,)
        finally:
            with pg_server.admin() as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {collection} CASCADE")
