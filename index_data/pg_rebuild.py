"""`index --rebuild` on a PostgreSQL collection: re-encode everything without ever breaking the collection.

As in the embedded store (index_data/rebuild.py), the new index is built aside by the ordinary pipeline,
here in a staging collection (a second schema, `<collection>__rebuild`), while the collection itself stays
complete and searchable with its old model. When the staging collection is finished, its images take the ids
their paths have in the collection (so /file/ID links keep naming the same files), and one transaction swaps
the two schemas (`ALTER SCHEMA … RENAME`) and drops the old one: readers see the old collection or the new
one, never a mix. A killed rebuild leaves the collection untouched and the staging collection resumable by
the same command; a rebuild with other inputs starts the staging collection afresh.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from index_data.rebuild_inputs import check_inputs, rebuild_inputs, resumable
from retrieval.errors import IndexNotFoundError, ModelMismatchError
from retrieval.faults import checkpoint
from retrieval.modelspec import parse_spec
from retrieval.store.index import Index
from retrieval.store.pg.index import PUBLISH_LOCK
from retrieval.store.pg.location import parse_location
from retrieval.store.pg.schema import drop_collection, quoted
from retrieval.store.switch import STAGING_KEY, planned_id_moves, require_complete


def staging_name(collection: str) -> str:
    """The staging collection's schema: `<collection>__rebuild`, or a hashed name when that is too long."""
    name = f"{collection}__rebuild"
    if len(name) <= 63:
        return name
    return f"rebuild_{hashlib.sha256(collection.encode()).hexdigest()[:24]}"


def _run_staged(run_index, main, stage_url: str, stage_schema: str, opts, what: dict):
    with Index.open_for_write(stage_url) as st, st.store.transaction():
        st.store.set_manifest(STAGING_KEY, what)
    try:
        return run_index(stage_url, opts)
    except Exception:
        if not resumable(stage_url, what):  # failed before a model was recorded: leave nothing behind
            drop_collection(main.store.db.pg, stage_schema)
        raise


def keep_ids(main, stage_url: str) -> int:
    """Give each staging image the id its path has in the collection (new paths get ids above both), then
    remake the staging vectors from its raw embeddings (no encoding). Returns how many rows moved."""
    with Index.open_for_write(stage_url, create=False) as st:
        pg = st.store.db.pg
        moves, top = planned_id_moves(main.store, st.store)
        if moves:
            with st.store.transaction():
                pg.execute("CREATE TEMP TABLE id_moves (old bigint PRIMARY KEY, new bigint) ON COMMIT DROP")
                with pg.cursor() as cur:
                    cur.executemany("INSERT INTO id_moves VALUES (%s, %s)", moves)
                # captions point at images without ON UPDATE: detach them, move the images, re-attach
                pg.execute(
                    "CREATE TEMP TABLE caption_moves ON COMMIT DROP AS SELECT c.id, m.new FROM captions c "
                    "JOIN id_moves m ON m.old = c.image_id"
                )
                pg.execute("UPDATE captions SET image_id = NULL WHERE id IN (SELECT id FROM caption_moves)")
                pg.execute("DELETE FROM image_vectors WHERE id IN (SELECT old FROM id_moves)")
                shift = top  # above every id in use: the two-step renumbering never collides
                pg.execute("UPDATE images SET id = id + %s WHERE id IN (SELECT old FROM id_moves)", [shift])
                pg.execute("UPDATE images i SET id = m.new FROM id_moves m WHERE i.id = m.old + %s", [shift])
                pg.execute("UPDATE captions c SET image_id = m.new FROM caption_moves m WHERE c.id = m.id")
                pg.execute("SELECT setval(pg_get_serial_sequence('images', 'id'), %s)", [top])
            st.sync_vectors(force_rebuild=True)
    return len(moves)


def switch_in(main, stage_url: str, stage_schema: str) -> int:
    """Make the finished staging collection the collection, under a new generation. Returns it. Raises
    RetrievalError when the staging collection is not complete; then nothing changes."""
    keep_ids(main, stage_url)
    require_complete(stage_url, f"collection {stage_schema}")
    collection = main.loc.collection
    gone = f"{stage_schema}_old"  # staging_name keeps this within 63 bytes only for short names
    gone = gone if len(gone) <= 63 else f"old_{hashlib.sha256(collection.encode()).hexdigest()[:24]}"
    pg = main.store.db.pg
    next_gen = main.generation + 1
    checkpoint("switch")
    with pg.transaction():  # under the publish lock: no publish of either schema during the swap
        pg.execute("SELECT pg_advisory_xact_lock(hashtext(%s), %s)", [collection, PUBLISH_LOCK])
        s = quoted(stage_schema)
        pg.execute(f"DELETE FROM {s}.manifest WHERE key = %s", [STAGING_KEY])
        pg.execute(
            f"INSERT INTO {s}.manifest (key, value) VALUES ('generation', %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [str(next_gen)],
        )
        pg.execute(f"DROP SCHEMA IF EXISTS {quoted(gone)} CASCADE")
        pg.execute(f"ALTER SCHEMA {quoted(collection)} RENAME TO {quoted(gone)}")
        pg.execute(f"ALTER SCHEMA {s} RENAME TO {quoted(collection)}")
        pg.execute(f"DROP SCHEMA {quoted(gone)} CASCADE")
    return next_gen


def run_pg_rebuild(url: str, opts, run_index):
    """`index --rebuild` of the collection at `url`; `run_index` is the pipeline's entry point."""
    try:
        main = Index.open_for_write(url, create=False)
    except IndexNotFoundError:  # no collection yet: nothing to keep, build in place
        return run_index(url, replace(opts, rebuild=False))
    try:
        if main.identity is None:  # nothing finished to keep: build in place
            main.close()
            main = None
            return run_index(url, replace(opts, rebuild=False))
        spec = str(parse_spec(opts.model)) if opts.model else main.identity.spec
        check_inputs(opts)
        loc = parse_location(url)
        stage_schema = staging_name(loc.collection)
        stage_url = loc.with_collection(stage_schema)
        what = rebuild_inputs(opts, spec)
        if not resumable(stage_url, what):
            drop_collection(main.store.db.pg, stage_schema)
        index_type = opts.index_type or main.store.get_manifest("index_type_requested", "auto")
        staged = replace(opts, rebuild=False, model=spec, index_type=index_type)
        try:
            report = _run_staged(run_index, main, stage_url, stage_schema, staged, what)
        except ModelMismatchError:  # same spec, other weights: start the staging collection afresh
            drop_collection(main.store.db.pg, stage_schema)
            report = _run_staged(run_index, main, stage_url, stage_schema, staged, what)
        if report.interrupted:  # Ctrl-C: the collection stays as it was; the same command resumes
            return report
        report.generation = switch_in(main, stage_url, stage_schema)
        report.images_total = main.store.count("images")
        return report
    finally:
        if main is not None:
            main.close()
