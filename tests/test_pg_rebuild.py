"""`index --rebuild` on a PostgreSQL collection (real server from pgserver): built aside in a staging
collection, switched in by one transaction, ids kept; a kill before the switch leaves the collection as it was
and the same command finishes it."""

import json
import signal

import faultkit as fk
from conftest import TINY, write_photos

from retrieval.store.index import Index
from retrieval.store.pg.location import parse_location

OTHER = "tiny-clip-b:none"  # dim 32, vs tiny-clip's 64


def _state(url):
    with Index.open(url) as idx:
        rows = {str(r[1]): int(r[0]) for r in idx.store.db.execute("SELECT id, path FROM images")}
        caps = idx.store.count("captions")
        return idx.identity.spec, idx.dim, rows, caps, idx.verify(), idx.generation


def _schemas(pg_server, collection):
    with pg_server.admin() as conn:
        rows = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", [collection + "%"])
        return sorted(r[0] for r in rows)


def _self_hit(url, photo, logs):
    argv = ["search", "--image", str(photo), "--index", url, "--device", "cpu", "-k", "1", "--json"]
    r = fk.zygote().start(argv, logs)
    assert r.wait() == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[0])


def test_rebuild_switches_in_with_ids_kept(tmp_path, pg_url, pg_server):
    photos = write_photos(tmp_path / "photos", 12)
    for i in range(3):
        (tmp_path / "photos" / f"img_{i:04d}.jpg.txt").write_text(f"sidecar caption {i}\n")
    z = fk.zygote()
    assert z.start(fk.index_argv([tmp_path / "photos"], pg_url), tmp_path / "logs").wait() == 0
    spec, dim, rows, caps, problems, gen = _state(pg_url)
    assert (spec, dim, len(rows), caps, problems) == (TINY, 64, 12, 3, [])

    photos[0].unlink()  # gone by the rebuild: not in the new collection
    write_photos(tmp_path / "photos", 1, start=50)  # new: an id above every old one
    r = z.start(fk.index_argv([tmp_path / "photos"], pg_url, "--rebuild", model=OTHER), tmp_path / "logs")
    assert r.wait() == 0, r.stderr
    spec2, dim2, rows2, caps2, problems2, gen2 = _state(pg_url)
    assert (spec2, dim2, caps2, problems2) == (OTHER, 32, 2, [])  # img_0000 and its sidecar are gone
    assert gen2 > gen
    assert set(rows2) == set(rows) - {str(photos[0])} | {str(tmp_path / "photos" / "img_0050.jpg")}
    assert all(rows2[p] == rows[p] for p in rows2 if p in rows)  # the same id for the same path
    assert rows2[str(tmp_path / "photos" / "img_0050.jpg")] > max(rows.values())
    collection = parse_location(pg_url).collection
    assert _schemas(pg_server, collection) == [collection]  # no staging or old schema left
    assert _self_hit(pg_url, photos[4], tmp_path / "logs")["path"] == str(photos[4])
    # a later run adds new files with fresh ids (the sequence moved with the ids)
    write_photos(tmp_path / "photos", 1, start=60)
    assert z.start(fk.index_argv([tmp_path / "photos"], pg_url, model=None), tmp_path / "logs").wait() == 0
    rows3 = _state(pg_url)[2]
    assert rows3[str(tmp_path / "photos" / "img_0060.jpg")] > max(rows2.values()) and len(rows3) == 13


def test_a_rebuild_killed_before_the_switch_keeps_the_collection_and_resumes(tmp_path, pg_url, pg_server):
    photos = write_photos(tmp_path / "photos", 10)
    z = fk.zygote()
    assert z.start(fk.index_argv([tmp_path / "photos"], pg_url), tmp_path / "logs").wait() == 0
    before = _state(pg_url)
    argv = fk.index_argv([tmp_path / "photos"], pg_url, "--rebuild", model=OTHER)
    run = z.start(argv, tmp_path / "logs", env=fk.child_env(RETRIEVAL_FAULT="switch:1"))
    assert run.wait() == -signal.SIGKILL
    assert _state(pg_url) == before  # the old model, every row, verify clean
    assert _self_hit(pg_url, photos[2], tmp_path / "logs")["path"] == str(photos[2])
    collection = parse_location(pg_url).collection
    assert f"{collection}__rebuild" in _schemas(pg_server, collection)  # resumable

    trace = tmp_path / "trace"
    resume = z.start(argv, tmp_path / "logs", env=fk.child_env(RETRIEVAL_FAULT_TRACE=trace))
    assert resume.wait() == 0, resume.stderr
    assert "encode" not in trace.read_text()  # resumed: nothing encoded again
    spec, dim, rows, _, problems, _ = _state(pg_url)
    assert (spec, dim, problems) == (OTHER, 32, []) and rows == before[2]
    assert _schemas(pg_server, collection) == [collection]
