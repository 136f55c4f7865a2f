"""Connections to PostgreSQL (placeholder until the connection layer lands)."""

from __future__ import annotations

from retrieval.errors import RetrievalError


def connect(loc, *, autocommit: bool = False):
    import psycopg

    try:
        conn = psycopg.connect(loc.dsn, autocommit=autocommit, connect_timeout=10, application_name="retrieval")
    except psycopg.OperationalError as e:
        raise RetrievalError(f"cannot connect to PostgreSQL at {loc.display}: {str(e).splitlines()[0]}") from None
    return conn


def ensure_extension(conn, loc) -> None:
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


def pg_error(exc, loc):
    import psycopg

    if isinstance(exc, psycopg.OperationalError):
        return RetrievalError(f"lost the connection to PostgreSQL at {loc.display}: {str(exc).splitlines()[0]}")
    return None
