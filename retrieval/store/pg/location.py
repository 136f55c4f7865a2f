"""Where a PostgreSQL collection lives: the connection URL and the collection (a schema) inside it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from retrieval.errors import RetrievalError

DEFAULT_COLLECTION = "retrieval"
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def is_database_url(value) -> bool:
    return isinstance(value, str) and value.startswith(("postgresql://", "postgres://"))


@dataclass(frozen=True)
class PgLocation:
    dsn: str
    collection: str

    @property
    def display(self) -> str:
        parts = urlsplit(self.dsn)
        netloc = parts.netloc
        if "@" in netloc:
            user, host = netloc.rsplit("@", 1)
            if ":" in user:
                user = user.split(":", 1)[0] + ":***"
            netloc = f"{user}@{host}"
        q = parse_qsl(parts.query) + [("collection", self.collection)]
        return urlunsplit((parts.scheme, netloc, parts.path, urlencode(q, safe="/"), ""))


def parse_location(url: str) -> PgLocation:
    parts = urlsplit(url)
    q = parse_qsl(parts.query, keep_blank_values=True)
    names = [v for k, v in q if k == "collection"]
    collection = names[-1] if names else DEFAULT_COLLECTION
    if not _NAME.match(collection):
        raise RetrievalError(f"collection name {collection!r}: use lower-case letters, digits and _ (at most 63)")
    rest = [(k, v) for k, v in q if k != "collection"]
    dsn = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest, safe="/"), ""))
    return PgLocation(dsn, collection)
