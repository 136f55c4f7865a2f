"""PostgreSQL locations and connections: URLs parsed and shown safely, and every way a connection fails is one line
that says what to do. Against a real server (tests/pg_support.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest

from retrieval.errors import RetrievalError
from retrieval.store.pg.connect import connect, ensure_extension, pg_error
from retrieval.store.pg.location import PgLocation, is_database_url, parse_location

ROOT = Path(__file__).resolve().parent.parent


def one_line(err: BaseException, *needles: str) -> str:
    """The error is a RetrievalError on one line that contains each needle."""
    assert isinstance(err, RetrievalError), repr(err)
    text = str(err)
    assert "\n" not in text and text.strip() == text
    for needle in needles:
        assert needle in text, text
    return text


def refused(loc: PgLocation) -> RetrievalError:
    """connect() fails with a RetrievalError raised from None (no psycopg traceback behind it)."""
    with pytest.raises(RetrievalError) as caught:
        connect(loc)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    return caught.value


# --- URLs ---


def test_is_database_url():
    assert is_database_url("postgresql://u@h/db") and is_database_url("postgres://h/db")
    assert is_database_url("POSTGRESQL://h/db")
    assert not is_database_url(Path("postgresql:") / "h")
    assert not is_database_url("idx") and not is_database_url("/data/postgresql://x") and not is_database_url(None)


def test_collection_is_stripped_and_other_parameters_kept():
    loc = parse_location("postgresql://postgres:@/postgres?host=/tmp/pg-x&collection=photos")
    assert loc == PgLocation(dsn="postgresql://postgres:@/postgres?host=/tmp/pg-x", collection="photos")
    loc = parse_location("postgresql://u@h:5433/db?collection=c1&sslmode=require&application_name=me")
    assert loc.dsn == "postgresql://u@h:5433/db?sslmode=require&application_name=me" and loc.collection == "c1"
    loc = parse_location("postgres://h/db")
    assert loc.dsn == "postgres://h/db" and loc.collection == "retrieval"
    loc = parse_location("postgresql://u:p%40ss@[::1]:5432/db?collection=c&connect_timeout=3")
    assert loc.dsn == "postgresql://u:p%40ss@[::1]:5432/db?connect_timeout=3"
    assert loc.display == "postgresql://u:***@[::1]:5432/db?connect_timeout=3&collection=c"


def test_display_hides_the_password_and_shows_the_collection():
    loc = parse_location("postgresql://alice:s3cret@db.example:5432/photos?sslmode=require&collection=family")
    assert "s3cret" in loc.dsn  # libpq gets it; messages never do
    assert loc.display == "postgresql://alice:***@db.example:5432/photos?sslmode=require&collection=family"
    assert (
        parse_location("postgresql://h/db?password=pw").display == "postgresql://h/db?password=***&collection=retrieval"
    )
    assert parse_location("postgresql://h/db").display == "postgresql://h/db?collection=retrieval"


@pytest.mark.parametrize(
    "name", ["Photos", "1st", "a-b", "x" * 64, "", "a%20b", "retrieval;drop", "caf%C3%A9", "public.x"]
)
def test_bad_collection_names_are_refused(name):
    with pytest.raises(RetrievalError) as caught:
        parse_location(f"postgresql://u:pw@h/db?collection={name}")
    one_line(caught.value, "a-z, 0-9 and _")
    assert "pw" not in str(caught.value).replace("postgresql", "")


def test_good_collection_names():
    for name in ["a", "_x", "photos_2024", "x" * 63]:
        assert parse_location(f"postgresql://h/db?collection={name}").collection == name


@pytest.mark.parametrize(
    "url,needle",
    [
        ("postgresql://u:secret@h:99999/db", "cannot parse"),
        ("postgresql://u:secret@[::1/db", "cannot parse"),
        ("postgresql://u:secret@h/db?no_such_setting=1", "cannot parse"),
        ("postgresql://h/db?collection=a&collection=b", "more than once"),
        ("http://h/db", "must start with postgresql://"),
    ],
)
def test_unparseable_urls_are_one_line(url, needle):
    with pytest.raises(RetrievalError) as caught:
        parse_location(url)
    assert "secret" not in one_line(caught.value, needle)


# --- connections against the real server ---


def test_connect_registers_pgvector_once_the_extension_exists(pg_url, pg_server):
    loc = parse_location(pg_url)
    database = f"v_{uuid.uuid4().hex}"
    with pg_server.admin() as admin:
        admin.execute(f"CREATE DATABASE {database}")
    try:
        db_loc = parse_location(pg_server.url_for(database=database) + "&collection=c")
        with connect(db_loc) as conn:  # autocommit off: the extension check must leave it idle
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            ensure_extension(conn, db_loc)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            # pgvector >= 0.5 loads a vector as pgvector.Vector and dumps numpy arrays as vectors
            assert conn.execute("SELECT '[1,2,3]'::vector").fetchone()[0].to_list() == [1.0, 2.0, 3.0]
            sent = np.array([0.5, -1.0], dtype=np.float32)
            assert conn.execute("SELECT %s::vector", (sent,)).fetchone()[0].to_numpy().tolist() == [0.5, -1.0]
        with connect(db_loc, autocommit=True) as conn:  # committed, and registered on a new connection
            assert conn.execute("SELECT '[4,5]'::vector").fetchone()[0].to_list() == [4.0, 5.0]
            assert conn.execute("SHOW application_name").fetchone()[0] == "retrieval"
        with connect(loc) as conn:
            ensure_extension(conn, loc)  # already there: nothing to do, no error
    finally:
        with pg_server.admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def test_wrong_password(pg_server, pg_url):
    role = f"pw_{uuid.uuid4().hex[:12]}"
    hba = Path(pg_server.admin().execute("SHOW hba_file").fetchone()[0])
    original = hba.read_text()
    with pg_server.admin() as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'right-one'")
        # pgserver trusts everyone: ask this role, and only it, for a password
        hba.write_text(f"local all {role} scram-sha-256\nhost all {role} all scram-sha-256\n" + original)
        admin.execute("SELECT pg_reload_conf()")
    try:
        collection = pg_url.rpartition("collection=")[2]
        good = parse_location(pg_server.url_for(user=role, password="right-one") + f"&collection={collection}")
        with connect(good) as conn:  # the password is checked, and this one is accepted
            assert conn.execute("SELECT current_user").fetchone()[0] == role
        bad = parse_location(pg_server.url_for(user=role, password="wrong-one") + f"&collection={collection}")
        text = one_line(refused(bad), f"refused the password for user {role}", "PGPASSWORD or ~/.pgpass")
        assert "wrong-one" not in text and ":***@" in text
        none = parse_location(pg_server.url_for(user=role) + f"&collection={collection}")
        one_line(refused(none), f"wants a password for user {role}", "PGPASSWORD")
    finally:
        hba.write_text(original)
        with pg_server.admin() as admin:
            admin.execute("SELECT pg_reload_conf()")
            admin.execute(f"DROP ROLE {role}")


def test_unknown_role_and_unknown_database(pg_server):
    ghost = f"nobody_{uuid.uuid4().hex[:8]}"
    one_line(refused(parse_location(pg_server.url_for(user=ghost))), f"has no role {ghost}", "CREATE ROLE")
    missing = f"nodb_{uuid.uuid4().hex[:8]}"
    loc = parse_location(pg_server.url_for(database=missing))
    one_line(refused(loc), f"has no database {missing}", f"createdb {missing}")


def test_nothing_listening_on_a_socket_or_a_port():
    empty = tempfile.mkdtemp(prefix="pg-none-", dir="/tmp" if Path("/tmp").is_dir() else None)
    try:
        loc = parse_location(f"postgresql://postgres@/postgres?host={empty}")
        one_line(refused(loc), "cannot reach PostgreSQL at", empty, "is it running?")
    finally:
        Path(empty).rmdir()
    # a port bound but never listening refuses connections, and no other process can take it meanwhile
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        loc = parse_location(f"postgresql://postgres@127.0.0.1:{port}/postgres?collection=c")
        one_line(refused(loc), f"cannot reach PostgreSQL at postgresql://postgres@127.0.0.1:{port}/", "is it running?")


def test_a_server_that_never_answers_times_out(pg_url):
    """A port that accepts the TCP handshake but never speaks: the connect timeout ends the wait, in one line."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        # libpq's shortest timeout is 2 s; the URL's own setting wins over connect()'s 10 s default
        loc = parse_location(f"postgresql://postgres@127.0.0.1:{port}/postgres?connect_timeout=2")
        one_line(refused(loc), "did not answer within 2 s", "is it running")


def test_connection_limit_reached(pg_server):
    role = f"one_{uuid.uuid4().hex[:10]}"
    with pg_server.admin() as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
    try:
        loc = parse_location(pg_server.url_for(user=role))
        with connect(loc):
            one_line(refused(loc), "refuses more connections", "run fewer processes at once")
    finally:
        with pg_server.admin() as admin:
            admin.execute(f"DROP ROLE {role}")


def test_read_only_server(pg_url):
    loc = parse_location(pg_url)
    with connect(loc, autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = on")  # what a standby enforces
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(f"CREATE SCHEMA {loc.collection}")
        one_line(pg_error(caught.value, loc), "only allows reads", "point the URL at the primary")


def test_missing_extension_for_a_role_that_may_not_create_it(pg_server):
    suffix = uuid.uuid4().hex[:10]
    database, role = f"noext_{suffix}", f"plain_{suffix}"
    with pg_server.admin() as admin:
        admin.execute(f"CREATE DATABASE {database}")
        admin.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER")
    try:
        loc = parse_location(pg_server.url_for(user=role, database=database))
        with connect(loc) as conn:  # no extension yet: connecting works, creating it does not
            with pytest.raises(RetrievalError) as caught:
                ensure_extension(conn, loc)
            one_line(caught.value, f"in database {database}", f"user {role} may not create it")
            one_line(caught.value, f"run `CREATE EXTENSION vector;` as a superuser in database {database}")
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'vector'").fetchone()[0] == 0
    finally:
        with pg_server.admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            admin.execute(f"DROP ROLE IF EXISTS {role}")


def test_terminated_backend_mid_use(pg_server, pg_url):
    loc = parse_location(pg_url)
    conn = connect(loc, autocommit=True)
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pg_server.admin() as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,)).fetchone() == (True,)
        for _ in range(2):  # the termination notice, then the connection found closed
            with pytest.raises(psycopg.Error) as caught:
                conn.execute("SELECT 1")
            one_line(pg_error(caught.value, loc), "lost the connection to PostgreSQL at", "run the command again")
    finally:
        conn.close()


def test_errors_that_are_bugs_are_not_mapped(pg_url):
    loc = parse_location(pg_url)
    with connect(loc, autocommit=True) as conn:
        for sql in ("SELECT * FROM no_such_table", "SELECT 1/0", "SELEC 1"):
            with pytest.raises(psycopg.Error) as caught:
                conn.execute(sql)
            assert pg_error(caught.value, loc) is None
    assert pg_error(ValueError("connection refused"), loc) is None


def test_server_restart(pg_server, pg_url):
    loc = parse_location(pg_url)
    uri = pg_server.uri
    conn = connect(loc, autocommit=True)
    try:
        pg_server.stop()
        one_line(refused(loc), "cannot reach PostgreSQL at", "is it running?")
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT 1")
        one_line(pg_error(caught.value, loc), "lost the connection", "what was committed is kept")
        pg_server.start()
        assert pg_server.uri == uri
        with connect(loc) as fresh:
            assert fresh.execute("SELECT 1").fetchone() == (1,)
            before = fresh.info.backend_pid
        pg_server.restart()
        with connect(loc, autocommit=True) as fresh:
            assert fresh.execute("SELECT 2").fetchone() == (2,) and fresh.info.backend_pid != before
    finally:
        conn.close()
        pg_server.start()


def test_missing_psycopg_is_one_line(pg_url):
    """Without the extra installed (psycopg not importable), connect() says how to install it."""
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from retrieval.store.pg.connect import connect\n"
        "from retrieval.store.pg.location import parse_location\n"
        "try:\n    connect(parse_location(sys.argv[1]))\n"
        "except Exception as e:\n    print(type(e).__name__, e, sep='|')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, pg_url], capture_output=True, text=True, cwd=ROOT, check=True)
    kind, text = out.stdout.strip().split("|")
    assert kind == "RetrievalError" and "pip install 'retrieval-engine[postgres]'" in text
