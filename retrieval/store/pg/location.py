"""Where a PostgreSQL index lives: a libpq URL plus the collection (a schema) inside its database."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from retrieval.errors import RetrievalError

SCHEMES = ("postgresql://", "postgres://")
DEFAULT_COLLECTION = "retrieval"
# a collection becomes a PostgreSQL schema: lower case so it never needs quoting, at most NAMEDATALEN - 1 bytes
COLLECTION_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
COLLECTION_RULE = "1 to 63 characters of a-z, 0-9 and _, not starting with a digit"
# query parameters that carry secrets, hidden from every message like the password in the authority
_SECRET_PARAMS = {"password", "sslpassword"}


def is_database_url(value: object) -> bool:
    """Whether an --index value names a PostgreSQL database (a Path never does: it is always a directory)."""
    return isinstance(value, str) and value.lower().startswith(SCHEMES)


@dataclass(frozen=True)
class PgLocation:
    """A collection in a PostgreSQL database: `dsn` is the URL given, less its `collection` parameter."""

    dsn: str
    collection: str

    @property
    def url(self) -> str:
        """The URL to connect with (secrets included: never print it)."""
        return self.with_collection(self.collection)

    def with_collection(self, collection: str) -> str:
        """A URL (secrets included, for connecting) naming `collection` in the same database."""
        return f"{self.dsn}{'&' if '?' in self.dsn else '?'}collection={collection}"

    @property
    def display(self) -> str:
        """The URL for messages: password hidden, collection shown as the user would write it."""
        parts = urlsplit(self.dsn)
        query = [_hide_secret(item) for item in parts.query.split("&") if item]
        query.append(f"collection={self.collection}")
        return urlunsplit(parts._replace(netloc=_hide_password(parts), query="&".join(query)))


def parse_location(url: str) -> PgLocation:
    """Split `postgresql://...[?collection=NAME]` into the libpq URL and the collection, checking both."""
    if not is_database_url(url):
        raise RetrievalError(f"not a PostgreSQL URL: {url!r}: it must start with postgresql:// or postgres://")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- urlsplit checks the port only when it is read
    except ValueError as exc:
        raise RetrievalError(f"cannot parse the PostgreSQL URL {_redact(url)}: {exc}") from None
    kept, collections = [], []
    # the other parameters are kept byte for byte (pgserver's host=/tmp/... must reach libpq unchanged)
    for item in parts.query.split("&"):
        key, _, value = item.partition("=")
        if unquote(key) == "collection":
            collections.append(unquote(value))
        elif item:
            kept.append(item)
    if len(collections) > 1:
        raise RetrievalError(f"the PostgreSQL URL {_redact(url)} names a collection more than once: give it once")
    collection = collections[0] if collections else DEFAULT_COLLECTION
    if not COLLECTION_RE.match(collection):
        raise RetrievalError(f"bad collection name {collection!r} in {_redact(url)}: use {COLLECTION_RULE}")
    dsn = urlunsplit(parts._replace(query="&".join(kept)))
    _check_with_libpq(dsn, url)
    return PgLocation(dsn=dsn, collection=collection)


def _check_with_libpq(dsn: str, url: str) -> None:
    """libpq's own parser, when psycopg is installed, so a bad URL fails here and not at the first query."""
    try:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # connect() says how to install the extra
        return
    try:
        conninfo_to_dict(dsn)
    except ProgrammingError as exc:
        reason = " ".join(str(exc).split())
        raise RetrievalError(f"cannot parse the PostgreSQL URL {_redact(url)}: {reason}") from None


def _hide_password(parts: SplitResult) -> str:
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return parts.netloc
    user, colon, password = userinfo.partition(":")
    return f"{user}:***@{hostport}" if password else f"{user}@{hostport}"


def _hide_secret(item: str) -> str:
    key, eq, _ = item.partition("=")
    return f"{key}=***" if eq and unquote(key) in _SECRET_PARAMS else item


def _redact(url: str) -> str:
    """A URL that failed to parse, for a message: everything between :// and the last @ hidden if it has one."""
    try:
        parts = urlsplit(url)
        query = "&".join(_hide_secret(item) for item in parts.query.split("&") if item)
        return urlunsplit(parts._replace(netloc=_hide_password(parts), query=query))
    except ValueError:
        scheme, sep, rest = url.partition("://")
        return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else url
