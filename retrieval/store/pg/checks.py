"""`verify` and `verify --repair` for a PostgreSQL collection: the manifest, the raw embeddings, the fused
vectors and the fusion checked against each other in SQL. Part of retrieval.store.pg.index.PgIndex (a mixin)."""

from __future__ import annotations

from retrieval.errors import RetrievalError
from retrieval.store.pg.schema import VECTOR_TABLES, vector_dim


class PgChecks:
    def verify(self) -> list[str]:
        """Problems found, one line each (empty: all is well)."""
        from retrieval.store.db import SCHEMA_VERSION

        problems: list[str] = []
        store, pg = self.store, self.store.db.pg
        manifest = store.manifest()
        ident, dim = self.identity, self.dim
        if ident is None:
            problems.append("manifest: no model recorded")
        if dim <= 0:
            problems.append("manifest: no vector dimension recorded")
        elif ident is not None and ident.dim != dim:
            problems.append(f"manifest: dim {dim} but the model {ident.spec} has dim {ident.dim}")
        if manifest.get("schema_version") != SCHEMA_VERSION:
            problems.append(f"manifest: schema version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}")
        for kind, table in VECTOR_TABLES.items():
            parent, key, ekind = ("images", "hash", "image") if kind == "images" else ("captions", "text_hash", "text")
            lacking = pg.execute(
                f"SELECT count(*) FROM {parent} p LEFT JOIN embeddings e ON e.kind = %s AND e.key = p.{key} "
                "WHERE e.key IS NULL",
                [ekind],
            ).fetchone()[0]
            if lacking:
                problems.append(f"{kind}: {lacking} rows lack a stored raw embedding")
            if dim > 0:
                wrong = pg.execute(
                    "SELECT count(*) FROM embeddings WHERE kind = %s AND length(vector) != %s", [ekind, 4 * dim]
                ).fetchone()[0]
                if wrong:
                    problems.append(f"{kind}: {wrong} stored raw embeddings are not {dim} float32 values")
            have_dim = vector_dim(pg, table)
            if have_dim is None:
                if store.count(parent):
                    problems.append(f"{kind}: the vector table {table} is missing")
                continue
            if dim > 0 and have_dim != dim:
                problems.append(f"{kind}: vector dim {have_dim} != manifest dim {dim}")
            no_vec = pg.execute(
                f"SELECT count(*) FROM {parent} p LEFT JOIN {table} v ON v.id = p.id WHERE v.id IS NULL"
            ).fetchone()[0]
            if no_vec:
                problems.append(
                    f"{kind}: {no_vec} rows have no vector (an interrupted run: the next index run or verify "
                    f"--repair adds them)"
                )
            n = store.count(table)
            counted = manifest.get(f"vectors_{kind}")
            if counted is not None and int(counted) != n:
                problems.append(f"{kind}: the manifest counts {counted} vectors, {table} holds {n}")
            if not pg.execute(
                "SELECT 1 FROM pg_indexes WHERE schemaname = %s AND indexname = %s",
                [self.loc.collection, f"{table}_hnsw"],
            ).fetchone():
                problems.append(f"{kind}: the HNSW index {table}_hnsw is missing (verify --repair remakes it)")
            vi = self.vectors(kind)
            if vi is not None and dim > 0 and have_dim == dim and not lacking:
                rows = [tuple(r) for r in pg.execute(f"SELECT p.id, p.{key} FROM {parent} p JOIN {table} v USING (id)")]
                ids = sorted(i for i, _ in rows)
                off = self._sampled_content_mismatches(kind, vi, ids, dict(rows))
                if off:
                    problems.append(
                        f"{kind}: {off[0]} of {off[1]} sampled vectors in {table} differ from what the raw "
                        f"embeddings give (one of the two is corrupt)"
                    )
        fusion = manifest.get("fusion")
        if isinstance(fusion, dict) and fusion.get("file") and store.get_file(fusion["file"]) is None:
            problems.append(f"fusion: {fusion['file']} named by the manifest is missing")
        return problems

    def repair(self) -> list[str]:
        """Remove rows that cannot get a vector (the next index run re-encodes their files), then remake
        every fused vector and both HNSW indexes from the raw embeddings."""
        from retrieval.store.pg.schema import drop_vector_indexes, ensure_vector_tables

        assert self.writable
        store, pg, dim = self.store, self.store.db.pg, self.dim
        if self.identity is None or dim <= 0:
            raise RetrievalError(
                f"cannot repair {self.root}: no model recorded; re-index with: retrieval index PATH --rebuild "
                f"--model SPEC"
            )
        done = []
        with store.transaction():
            bad = pg.execute("DELETE FROM embeddings WHERE length(vector) != %s", [4 * dim]).rowcount
            if bad:
                done.append(f"removed {bad} raw embeddings of the wrong size")
            lost = pg.execute(
                "DELETE FROM images i WHERE NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.kind = 'image' AND "
                "e.key = i.hash)"
            ).rowcount
            if lost:
                done.append(f"removed {lost} image rows without a raw embedding (the next index run re-encodes them)")
            n = pg.execute(
                "DELETE FROM captions c WHERE NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.kind = 'text' AND "
                "e.key = c.text_hash)"
            ).rowcount
            if n:
                done.append(f"removed {n} caption rows without a raw embedding (the next index run re-adds them)")
        drop_vector_indexes(pg)
        ensure_vector_tables(pg, self.loc.collection, dim)
        self.sync_vectors(force_rebuild=True)
        done.append(f"vectors and HNSW indexes remade from the stored raw embeddings as generation {self.generation}")
        return done
