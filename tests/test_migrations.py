"""Numbered schema steps (retrieval/store/migrations.py): an index from older code migrates on a writable
open, keeps its rows, and captions follow their image out by foreign key."""

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from conftest import run_python

from retrieval.cli import main
from retrieval.store.db import Store
from retrieval.store.migrations import LATEST

FIXTURE = Path(__file__).parent / "fixtures" / "index_v1"


def _copy(tmp_path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "old")
    return tmp_path / "old" / "idx" / "meta.sqlite"


def _peek(db: Path, sql: str):
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _version(db: Path) -> int:
    return _peek(db, "PRAGMA user_version")[0][0]


def _captions_sql(db: Path) -> str:
    return _peek(db, "SELECT sql FROM sqlite_master WHERE name = 'captions'")[0][0]


def test_old_index_migrates_on_writable_open_and_keeps_rows(tmp_path):
    db = _copy(tmp_path)
    assert _version(db) == 0 and "REFERENCES" not in _captions_sql(db)
    before = _peek(db, "SELECT id, image_id, text, text_hash, source FROM captions ORDER BY id")
    images = _peek(db, "SELECT * FROM images ORDER BY id")
    r = CliRunner().invoke(main, ["search", "photo", "--index", str(db.parent), "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert _version(db) == 0  # readers never migrate
    Store(db).close()
    assert _version(db) == LATEST
    assert "ON DELETE CASCADE" in _captions_sql(db)
    assert _peek(db, "SELECT id, image_id, text, text_hash, source FROM captions ORDER BY id") == before
    assert _peek(db, "SELECT * FROM images ORDER BY id") == images
    assert _peek(db, "PRAGMA foreign_key_check") == []
    assert _peek(db, "SELECT value FROM manifest WHERE key = 'schema_version'") == [("1",)]
    for args in (["verify"], ["search", "photo number 1", "-k", "3", "--json"]):
        r = CliRunner().invoke(main, [*args, "--index", str(db.parent)])
        assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 3


def test_deleting_an_image_deletes_its_captions(tmp_path):
    db = _copy(tmp_path)
    store = Store(db)
    try:
        caps = store.db.execute("SELECT image_id, COUNT(*) FROM captions GROUP BY image_id").fetchall()
        victim = caps[0][0]
        with store.transaction():
            store.delete_images([victim])
        assert store.captions_for_images([victim]) == {}
        assert store.count("captions") == sum(n for _, n in caps) - caps[0][1]
        # plain SQL on the store's connection cascades too
        other = caps[1][0]
        with store.transaction():
            store.db.execute("DELETE FROM images WHERE id = ?", [other])
        assert store.captions_for_images([other]) == {}
    finally:
        store.close()


def test_migration_killed_midway_resumes_and_a_second_open_is_a_no_op(tmp_path):
    db = _copy(tmp_path)
    env = {**os.environ, "RETRIEVAL_FAULT": f"migrate:{LATEST}"}  # die inside the last step, before COMMIT
    code = f"from retrieval.store.db import Store; Store({str(db)!r})"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert p.returncode == -9, p.stderr
    assert _version(db) == LATEST - 1  # the earlier steps committed, the killed one left nothing
    assert "REFERENCES" not in _captions_sql(db)
    assert _peek(db, "SELECT name FROM sqlite_master WHERE name = 'captions_new'") == []
    rows = _peek(db, "SELECT * FROM captions ORDER BY id")
    for _ in range(2):
        Store(db).close()
        assert _version(db) == LATEST
        assert _peek(db, "SELECT * FROM captions ORDER BY id") == rows
    assert "ON DELETE CASCADE" in _captions_sql(db)


def test_new_index_starts_at_the_latest_version(tmp_path):
    db = tmp_path / "meta.sqlite"
    Store(db).close()
    assert _version(db) == LATEST and "ON DELETE CASCADE" in _captions_sql(db)
    cols = {r[1] for r in _peek(db, "PRAGMA table_info(images)")} | {
        r[1] for r in _peek(db, "PRAGMA table_info(errors)")
    }
    assert {"meta_hash", "taken_at", "gps_lon", "size", "mtime_ns"} <= cols


def test_a_writer_does_not_import_pandas_and_pandas_still_imports_after(tmp_path):
    """sqlite_utils imports pandas when it is installed (~0.3 s of every index run); the store's writer keeps it
    out, and a later `import pandas` in the same process still works."""
    code = (
        "import importlib.util, sys\n"
        "from retrieval.store.db import Store\n"
        f"s = Store({str(tmp_path / 'meta.sqlite')!r})\n"
        "s.db['t'].insert({'a': 1})\n"
        "print('pandas' in sys.modules, s.db['t'].count)\n"
        "if importlib.util.find_spec('pandas'):\n"
        "    import pandas\n"
        "    print(pandas.DataFrame({'a': [1]}).shape)\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0] == "False 1"
    if len([ln for ln in lines if ln]) > 1:
        assert lines[1] == "(1, 1)"
