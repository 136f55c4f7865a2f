"""A real PostgreSQL 16 with pgvector for the tests, from pgserver (its wheel ships both), and a fresh collection
per test. Nothing about PostgreSQL is mocked; fault tests stop, start and restart the same server.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

PGSERVER_MISSING = "the PostgreSQL tests need pgserver (a real server in a wheel): pip install -e '.[test]'"


class PgServer:
    """One pgserver data directory: its URL, a superuser connection, and stop / start / restart for faults."""

    def __init__(self, pgdata: Path):
        with warnings.catch_warnings():  # platformdirs warns on import when XDG_RUNTIME_DIR is unset (CI, containers)
            warnings.simplefilter("ignore")
            import pgserver

        self.pgdata = pgdata
        self._pgserver = pgserver
        self._server = pgserver.get_server(pgdata, cleanup_mode="stop")

    @property
    def uri(self) -> str:
        """The superuser's URL (pgserver's form: postgresql://postgres:@/postgres?host=SOCKET_DIR)."""
        return self._server.get_uri()

    def url_for(self, *, user: str | None = None, password: str | None = None, database: str | None = None) -> str:
        """The server's URL for another user, password or database (same socket or port)."""
        parts = urlsplit(self.uri)
        old_user, _, hostport = parts.netloc.rpartition("@")
        name = user or old_user.partition(":")[0]
        netloc = f"{name}:{password}@{hostport}" if password else f"{name}@{hostport}"
        return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}" if database else parts.path))

    def admin(self, database: str | None = None):
        """A superuser connection in autocommit, for setting up what a test needs."""
        import psycopg

        return psycopg.connect(self.url_for(database=database), autocommit=True)

    def stop(self) -> None:
        """Stop the server the way an administrator does (fast: sessions are ended, what was committed is kept)."""
        self._pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self._server.system_user)

    def start(self) -> None:
        """Start the same data directory again, on the same socket (a no-op when it is running)."""
        self._server.ensure_postgres_running()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.start()  # pgserver's own cleanup stops the server it knows of: the one running now
        self._server.cleanup()


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL 16 with pgvector for the whole test session."""
    if importlib.util.find_spec("pgserver") is None:
        pytest.fail(PGSERVER_MISSING, pytrace=False)
    # a short data directory: the server's unix socket lives in it and socket paths stop at ~107 bytes
    base = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp" if Path("/tmp").is_dir() else None))
    server = PgServer(base / "data")
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(base, ignore_errors=True)


def collection_url(uri: str, collection: str) -> str:
    return f"{uri}{'&' if '?' in uri else '?'}collection={collection}"


@pytest.fixture
def pg_url(pg_server):
    """A URL naming a collection of its own in the test server's database, dropped after the test."""
    collection = f"t_{uuid.uuid4().hex}"
    yield collection_url(pg_server.uri, collection)
    pg_server.start()  # a fault test may have left it stopped
    with pg_server.admin() as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {collection}, {collection}__rebuild, {collection}__rebuild_old CASCADE")
