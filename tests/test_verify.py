"""`retrieval verify [--repair]`: every kind of damage is reported on its own line with exit 1, --repair
rebuilds the vectors from the raw embeddings in SQLite (exit 0), user errors are one line with exit 2."""

from __future__ import annotations

import os
import shutil
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import build_index, write_photos

from retrieval.cli import main
from retrieval.query.searcher import Searcher
from retrieval.store.index import Index


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    photos = write_photos(root / "photos", 12)
    (root / "photos" / "img_0000.jpg.txt").write_text("a sidecar caption\nanother one\n")
    (root / "photos" / "img_0001.jpg.txt").write_text("third caption\n")
    build_index(root / "golden", [root / "photos"])
    return root, photos


@pytest.fixture
def idx(golden, tmp_path):
    root, photos = golden
    d = tmp_path / "idx"
    shutil.copytree(root / "golden", d)
    return d, photos


def verify(d, *extra):
    r = CliRunner().invoke(main, ["verify", "--index", str(d), *extra])
    return r.exit_code, r.stdout, r.stderr


def gen_of(d) -> int:
    with Index.open(d) as i:
        return i.generation


def assert_repairs(d, photos):
    code, out, _ = verify(d, "--repair")
    assert code == 0 and "repaired: vector files rebuilt" in out, out
    code, out, _ = verify(d)
    assert (code, out.strip()) == (0, "ok")
    with Searcher.open(d, device="cpu") as s:
        for p in (photos[0], photos[-1]):
            assert s.search(image=str(p), k=1)[0].path == str(p)
        assert s.search("a sidecar caption", to="captions", k=3)


def sql(d, *statements):
    con = sqlite3.connect(d / "meta.sqlite")
    with con:
        for st in statements:
            con.execute(st)
    con.close()


def test_clean_index_is_ok(idx):
    d, _ = idx
    assert verify(d)[:2] == (0, "ok\n")
    assert verify(d, "--repair")[:2] == (0, "ok\n")  # nothing to repair: nothing done


def test_deleted_vector_file(idx):
    d, photos = idx
    g = gen_of(d)
    os.remove(d / f"images.g{g}.faiss")
    code, out, _ = verify(d)
    assert code == 1 and f"problem: images: vector file images.g{g}.faiss of generation {g} is missing" in out
    assert_repairs(d, photos)
    assert gen_of(d) == g + 1


def test_garbage_vector_file(idx):
    d, photos = idx
    g = gen_of(d)
    f = d / f"captions.g{g}.faiss"
    f.write_bytes(np.random.default_rng(0).integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())
    code, out, _ = verify(d)
    assert code == 1 and f"problem: captions: cannot read captions.g{g}.faiss" in out
    assert len(out.splitlines()) == 1  # one line per problem, however long faiss's message
    assert_repairs(d, photos)


def test_truncated_vector_file(idx):
    d, photos = idx
    f = d / f"images.g{gen_of(d)}.faiss"
    f.write_bytes(f.read_bytes()[:100])
    code, out, _ = verify(d)
    assert code == 1 and f"problem: images: cannot read {f.name}" in out
    assert_repairs(d, photos)


def test_flipped_bytes_inside_the_vectors(idx):
    """The file's checksum covers its trailer, not faiss's data: the sampled content check catches it."""
    d, photos = idx
    f = d / f"images.g{gen_of(d)}.faiss"
    data = bytearray(f.read_bytes())
    vec_start = 200  # past the flat index header, inside the float32 vectors
    data[vec_start : vec_start + 64] = bytes(64)
    f.write_bytes(bytes(data))
    code, out, _ = verify(d)
    assert code == 1 and "sampled vectors in images.g" in out and "differ" in out, out
    assert_repairs(d, photos)


def test_rows_removed_behind_its_back(idx):
    d, photos = idx
    sql(d, "DELETE FROM images WHERE id IN (3, 4)", "DELETE FROM captions WHERE id = 1")
    code, out, _ = verify(d)
    lines = out.splitlines()
    assert code == 1
    assert "problem: images: 2 orphan vectors (in FAISS, not in SQLite)" in lines
    assert "problem: captions: 1 orphan vectors (in FAISS, not in SQLite)" in lines
    assert_repairs(d, photos[4:])  # photos[2] and [3] are ids 3, 4: no longer indexed
    with Index.open(d) as i:
        assert i.info().images == 10 and i.info().vectors == 10


def test_rows_without_vectors(idx):
    """Rows committed to SQLite but never published (what a killed run leaves) are reported."""
    d, photos = idx
    sql(
        d,
        "INSERT INTO images(path, path_raw, size, mtime_ns, hash, status) "
        "SELECT path || '.copy', CAST(path || '.copy' AS BLOB), size, mtime_ns, hash, status FROM images WHERE id = 5",
    )
    code, out, _ = verify(d)
    assert code == 1 and "problem: images: 1 rows have no vector (in SQLite, not in FAISS;" in out
    assert_repairs(d, photos)


def test_lost_raw_embedding_is_removed_then_reencoded(idx, golden):
    d, photos = idx
    with Index.open(d) as i:
        h = i.store.db.execute("SELECT hash FROM images WHERE id = 2").fetchone()[0]
    sql(d, f"DELETE FROM embeddings WHERE kind = 'image' AND key = '{h}'")
    code, out, _ = verify(d)
    assert code == 1 and "problem: images: 1 rows lack a stored raw embedding" in out
    code, out, _ = verify(d, "--repair")
    assert code == 0 and "repaired: removed 1 image rows without a raw embedding" in out, out
    assert verify(d)[:2] == (0, "ok\n")
    r = build_index(d, [golden[0] / "photos"], model=None)  # the next run re-encodes that file
    assert r.encoded == 1 and r.images_total == 12
    assert verify(d)[:2] == (0, "ok\n")


def test_manifest_problems(idx):
    d, photos = idx
    sql(
        d,
        "UPDATE manifest SET value = '999' WHERE key = 'dim'",
        "UPDATE manifest SET value = '7' WHERE key = 'vectors_captions'",
    )
    code, out, _ = verify(d)
    assert code == 1
    assert "problem: manifest: dim 999 but the model tiny-clip:none has dim 64" in out
    assert "problem: images: 12 stored raw embeddings are not 999 float32 values" in out
    assert "problem: captions: the manifest counts 7 vectors" in out
    sql(
        d,
        "UPDATE manifest SET value = '64' WHERE key = 'dim'",
        "UPDATE manifest SET value = '42' WHERE key = 'generation'",
    )
    code, out, _ = verify(d)
    assert code == 1 and "images.g42.faiss of generation 42 is missing" in out
    assert_repairs(d, photos)


def test_damaged_sqlite_is_reported_not_a_traceback(idx):
    d, _ = idx
    con = sqlite3.connect(d / "meta.sqlite")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = bytearray((d / "meta.sqlite").read_bytes())
    page = 4096
    for p in range(1, len(data) // page):  # keep page 1 (file header, schema): smash b-tree page headers
        data[p * page : p * page + 12] = b"\xff" * 12
    (d / "meta.sqlite").write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["verify", "--index", str(d)])
    assert r.exit_code in (1, 2) and "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "damaged" in r.output or "malformed" in r.output, r.output


def test_user_errors_exit_2_and_create_nothing(tmp_path, idx):
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (tmp_path / "nope", empty):
        code, out, err = verify(target)
        assert code == 2 and err.startswith("error: no index at") and len(err.splitlines()) == 1
    assert list(empty.iterdir()) == [] and not (tmp_path / "nope").exists()
    d, _ = idx
    with Index.open_for_write(d):  # a writer is running
        code, _, err = verify(d)
    assert code == 2 and "another process is writing" in err


def test_float16_vectors_verify_clean(golden, tmp_path):
    """ivfsq stores float16: its rounding (~1e-4) must not read as corruption in the sampled check, while a
    vector that really differs still does."""
    root, photos = golden
    d = tmp_path / "sq"
    build_index(d, [root / "photos"], index_type="ivfsq")
    with Index.open(d) as i:
        assert i.vectors("images").kind == "ivfsq"
    code, out, _ = verify(d)
    assert code == 0, out
    sql(
        d,
        "UPDATE embeddings SET vector = (SELECT vector FROM embeddings WHERE kind = 'image' ORDER BY rowid DESC "
        "LIMIT 1) "
        "WHERE rowid = (SELECT MIN(rowid) FROM embeddings WHERE kind = 'image')",
    )
    code, out, _ = verify(d)
    assert code == 1 and "differ" in out, out
