"""A real PostgreSQL 16 with pgvector (pgserver) for the tests of the PostgreSQL store."""

from __future__ import annotations

import shutil
import tempfile
import uuid

import pytest


class PgServer:
    def __init__(self, root: str):
        import pgserver

        self.root = root
        self._srv = pgserver.get_server(root, cleanup_mode="stop")
        self.uri = self._srv.get_uri()

    def url(self, collection: str) -> str:
        return f"{self.uri}{'&' if '?' in self.uri else '?'}collection={collection}"


@pytest.fixture(scope="session")
def pg_server():
    root = tempfile.mkdtemp(prefix="pg-", dir="/tmp")  # a short path: unix socket names are limited
    srv = PgServer(root)
    yield srv
    srv._srv.cleanup()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server):
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield pg_server.url(name)
    import psycopg

    with psycopg.connect(pg_server.uri, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
