"""Power loss: the WAL runs with synchronous=NORMAL (a power cut may roll back the last commits), so
every manifest switch (a publish, a rebuild's switch) commits with synchronous=FULL: once older
generations' files are pruned, the switch that made them unneeded is already on disk."""

from __future__ import annotations

from conftest import build_index, write_photos

from retrieval.store.index import Index
from retrieval.store.switch import switch_in


def _traced(idx: Index) -> list[str]:
    seen: list[str] = []
    idx.store.db.conn.set_trace_callback(lambda sql: seen.append(" ".join(sql.split())))
    return seen


def _assert_full_around_the_switch(seen: list[str]) -> None:
    full = seen.index("PRAGMA synchronous = FULL")
    switch = next(i for i, s in enumerate(seen) if "INSERT INTO manifest" in s and i > full)
    commit = next(i for i, s in enumerate(seen) if s == "COMMIT" and i > switch)
    normal = seen.index("PRAGMA synchronous = NORMAL", commit)
    assert full < switch < commit < normal
    assert "PRAGMA synchronous = NORMAL" not in seen[full:commit]


def test_publish_commits_with_synchronous_full(tmp_path):
    write_photos(tmp_path / "p", 3)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    with Index.open_for_write(tmp_path / "idx") as idx:
        with idx.store.transaction():
            idx.store.delete_images([1])  # a change for sync_vectors to publish
        seen = _traced(idx)
        gen = idx.generation
        assert idx.sync_vectors()
        assert idx.generation == gen + 1
        assert idx.store.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL again afterwards
    _assert_full_around_the_switch(seen)


def test_files_of_the_last_two_generations_are_kept(tmp_path):
    write_photos(tmp_path / "p", 2)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    for i in range(3):
        write_photos(tmp_path / "p", 1, start=20 + i)
        build_index(tmp_path / "idx", [tmp_path / "p"], model=None)
    with Index.open(tmp_path / "idx") as idx:
        gen = idx.generation
    names = {p.name for p in (tmp_path / "idx").glob("*.faiss")}
    for g in (gen, gen - 1):
        assert {f"images.g{g}.faiss", f"captions.g{g}.faiss"} <= names
    assert not any(f".g{gen - 2}." in n for n in names)


def test_rebuild_switch_commits_with_synchronous_full(tmp_path):
    write_photos(tmp_path / "p", 3)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    build_index(tmp_path / "idx" / "rebuild", [tmp_path / "p"], model="tiny-clip-b:none")
    with Index.open_for_write(tmp_path / "idx") as idx:
        seen = _traced(idx)
        switch_in(idx, tmp_path / "idx" / "rebuild")
        assert idx.identity.spec == "tiny-clip-b:none"
    _assert_full_around_the_switch(seen)
