"""Connections to PostgreSQL for a collection, pgvector ready, and its failures as one line that says what to do.

psycopg is an optional extra, imported only here so that the embedded store never needs it.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, NoReturn

from retrieval.errors import DatabaseUnavailableError, RetrievalError
from retrieval.store.pg.location import PgLocation

if TYPE_CHECKING:
    import psycopg

INSTALL_HINT = "pip install 'retrieval-engine[postgres]'"
CONNECT_TIMEOUT_S = 10  # libpq waits forever by default: a host that drops packets would hang the command
APPLICATION_NAME = "retrieval"  # how the sessions show in pg_stat_activity

# sessions the server ended: admin shutdown (or pg_terminate_backend), crash shutdown, idle-session timeout;
# class 08 (connection exceptions) is matched by its prefix
_LOST_STATES = ("57P01", "57P02", "57P05")
# libpq's own words (a failure before or outside a query has no sqlstate); matched case-insensitively
_UNREACHABLE = re.compile(
    r"connection refused|no such file or directory|could not translate host name|timeout expired"
    r"|network is unreachable|no route to host|name or service not known|could not connect to server",
    re.I,
)
_LOST = re.compile(
    r"server closed the connection|terminating connection|the connection is closed|connection is lost"
    r"|connection not open|could not receive data from server|could not send data to server|ssl syscall error"
    r"|consuming input failed|sending query failed|server conn crashed",
    re.I,
)
_CONFLICT_STATES = ("40P01", "40001")  # deadlock detected, serialization failure: another writer's transaction won
_STARTING = re.compile(r"the database system is (starting up|shutting down|in recovery mode|not yet accepting)", re.I)


_LAST: list[PgLocation] = []  # the collection this process connected to last, for `command_error`


def command_error(exc: BaseException) -> RetrievalError | None:
    """`pg_error` for a psycopg error that escaped a command, told against the collection this process last
    connected to; None when it is not a psycopg error we can explain (or psycopg was never imported)."""
    import sys

    if "psycopg" not in sys.modules or not _LAST:
        return None
    return pg_error(exc, _LAST[0])


def _psycopg() -> Any:
    """psycopg, or one line that says how to install it."""
    try:
        import psycopg
    except ImportError:
        raise RetrievalError(f"a PostgreSQL index needs psycopg and pgvector: {INSTALL_HINT}") from None
    return psycopg


def connect(loc: PgLocation, *, autocommit: bool = False) -> psycopg.Connection:
    """A psycopg 3 connection to the collection's database, with pgvector's types when the extension exists."""
    pg = _psycopg()
    try:
        from pgvector.psycopg import register_vector
    except ImportError:
        raise RetrievalError(f"a PostgreSQL index needs pgvector's Python package: {INSTALL_HINT}") from None
    _LAST[:] = [loc]
    given = _conninfo(loc)
    # the URL's own settings win: these are only defaults
    extra = {
        k: v
        for k, v in (("connect_timeout", CONNECT_TIMEOUT_S), ("application_name", APPLICATION_NAME))
        if k not in given
    }
    try:
        conn = pg.connect(loc.dsn, autocommit=autocommit, **extra)
    except pg.Error as exc:
        _raise_mapped(exc, loc)
    try:
        if _has_vector(conn):
            register_vector(conn)
        if not autocommit:
            conn.rollback()  # the look-ups above opened a transaction: hand the connection back idle
    except pg.Error as exc:
        conn.close()
        _raise_mapped(exc, loc)
    return conn


def ensure_extension(conn: psycopg.Connection, loc: PgLocation) -> None:
    """Create pgvector in this database when missing, and register its types; one line when that is impossible."""
    pg = _psycopg()
    try:
        _ensure_extension(pg, conn, loc)
    except pg.Error as exc:
        _raise_mapped(exc, loc)


def _ensure_extension(pg: Any, conn: psycopg.Connection, loc: PgLocation) -> None:
    from pgvector.psycopg import register_vector

    idle = conn.info.transaction_status == pg.pq.TransactionStatus.IDLE  # a caller's transaction is left alone
    if not _has_vector(conn):
        major = conn.info.server_version // 10000
        available = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone()
        if available is None:
            _end(conn, idle)
            raise RetrievalError(
                f"PostgreSQL {major} at {loc.display} has no pgvector extension: install it on the server "
                f"(Debian/Ubuntu: apt install postgresql-{major}-pgvector; see github.com/pgvector/pgvector), "
                "then run the command again"
            )
        _end(conn, idle)  # so the CREATE below commits on its own, not inside the reads' transaction
        try:
            # a savepoint inside a caller's transaction, a transaction of its own otherwise
            with conn.transaction():
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except pg.errors.InsufficientPrivilege:
            _end(conn, idle)
            db, user = conn.info.dbname, conn.info.user
            raise RetrievalError(
                f"pgvector is not installed in database {db} at {loc.display} and user {user} may not create it: "
                f"run `CREATE EXTENSION vector;` as a superuser in database {db}, then run the command again"
            ) from None
        except pg.errors.UniqueViolation:
            pass  # another process created it at the same moment: it exists now
    register_vector(conn)
    _end(conn, idle)


def pg_error(exc: BaseException, loc: PgLocation) -> RetrievalError | None:
    """A connection, authentication or server-side resource failure as one line; None for anything else (a bug)."""
    try:
        import psycopg
    except ImportError:
        return None
    if not isinstance(exc, psycopg.Error):
        return None
    state = getattr(exc, "sqlstate", None) or ""
    text = " ".join(str(exc).split())  # libpq's messages span lines; ours never do
    where, info = loc.display, _conninfo(loc)
    user = info.get("user") or os.environ.get("PGUSER") or _login_name()
    db = info.get("dbname") or os.environ.get("PGDATABASE") or user
    if state == "28P01" or "password authentication failed" in text:
        return RetrievalError(
            f"PostgreSQL refused the password for user {user} at {where}: check the URL, PGPASSWORD or ~/.pgpass"
        )
    if "no password supplied" in text:
        return RetrievalError(
            f"PostgreSQL wants a password for user {user} at {where}: put it in the URL, PGPASSWORD or ~/.pgpass"
        )
    if re.search(r'role ".*" does not exist', text):
        return RetrievalError(
            f"PostgreSQL at {where} has no role {user}: fix the user in the URL, or create it "
            f"(CREATE ROLE {user} LOGIN) as a superuser"
        )
    if state == "3D000" or re.search(r'database ".*" does not exist', text):
        return RetrievalError(
            f"PostgreSQL at {where} has no database {db}: fix the URL, or create it (createdb {db}) and run again"
        )
    if "no pg_hba.conf entry" in text:
        return RetrievalError(
            f"PostgreSQL at {where} does not let user {user} into database {db} from this host: "
            "add a pg_hba.conf line for it, or connect as a user it allows"
        )
    if state == "53300" or re.search(r"too many (clients|connections)|remaining connection slots", text):
        return RetrievalError(
            f"PostgreSQL at {where} refuses more connections (a connection limit is reached): run fewer processes "
            "at once, or raise the limit (max_connections, or the role's or database's CONNECTION LIMIT)"
        )
    if isinstance(exc, getattr(psycopg.errors, "ConnectionTimeout", ())) or text == "connection timeout expired":
        seconds = info.get("connect_timeout") or CONNECT_TIMEOUT_S
        return DatabaseUnavailableError(
            f"PostgreSQL at {where} did not answer within {seconds} s: is it running, and are the host and port right?"
        )
    if state == "57P03" or _STARTING.search(text):
        return DatabaseUnavailableError(
            f"PostgreSQL at {where} is starting up or shutting down: run the command again once it is up"
        )
    if state == "25006":
        return RetrievalError(
            f"PostgreSQL at {where} only allows reads (a standby, or default_transaction_read_only): "
            "point the URL at the primary server"
        )
    if state == "53100":
        return RetrievalError(
            f"the PostgreSQL server at {where} is out of disk space; what was committed is kept: "
            "free some space on the server, then run the command again"
        )
    if _is_connect_failure(text):
        if _UNREACHABLE.search(text):
            return DatabaseUnavailableError(
                f"cannot reach PostgreSQL at {where}: is it running? Check the host and port"
            )
        reason = text.split("failed: ")[-1]  # libpq's last clause is its reason
        return RetrievalError(f"cannot connect to PostgreSQL at {where}: {reason}")
    if state in _CONFLICT_STATES:
        return DatabaseUnavailableError(
            f"PostgreSQL at {where} aborted a transaction that conflicted with another writer's; what was committed "
            "is kept: run the command again"
        )
    if state in _LOST_STATES or state.startswith("08") or _LOST.search(text):
        return DatabaseUnavailableError(
            f"lost the connection to PostgreSQL at {where}; what was committed is kept: run the command again"
        )
    return None


def _raise_mapped(exc: Exception, loc: PgLocation) -> NoReturn:
    """Re-raise a psycopg error as its one line, without the traceback behind it; a bug's error as it is."""
    mapped = pg_error(exc, loc)
    if mapped is None:
        raise exc
    raise mapped from None


def _is_connect_failure(text: str) -> bool:
    """psycopg's prefixes for a connection that never opened."""
    return text.startswith(("connection failed:", "connection is bad:"))


def _has_vector(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is not None


def _end(conn: psycopg.Connection, idle: bool) -> None:
    """Hand back idle a connection that came idle: the catalogue reads opened a transaction (autocommit off)."""
    from psycopg.pq import TransactionStatus

    if idle and not conn.autocommit and conn.info.transaction_status != TransactionStatus.IDLE:
        conn.rollback()


def _conninfo(loc: PgLocation) -> dict[str, Any]:
    """The URL's settings as libpq reads them (host may be a socket directory given as ?host=)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        return conninfo_to_dict(loc.dsn)
    except Exception:  # parse_location checked it already; a message must never fail on its own
        return {}


def _login_name() -> str:
    """libpq's default user: the operating system's login name."""
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry): libpq would fail too
        return "?"
