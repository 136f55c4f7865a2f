"""The search parameters that GET /api/search (query string) and POST /api/search (form) share, declared once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from fastapi import Form, Query

from retrieval.errors import RetrievalError
from retrieval.query.arithmetic import parse_terms
from retrieval.query.photo_filters import PhotoFilter

MAX_K = 1000
MAX_TERMS = 32
AFTER_HELP = "Only photos taken on or after this ISO date (2019, 2019-06, 2019-06-21)"
BEFORE_HELP = "Only photos taken on or before this ISO date (the whole period named)"
CAMERA_HELP = "Only photos whose camera make or model contains this text (any case)"
NEAR_HELP = "LAT,LON: only photos taken within km of this point (EXIF GPS)"
KM_HELP = "Radius for near, in kilometres (default 10)"
ADD_HELP = "Query arithmetic (repeatable): [WEIGHT:]TEXT or [WEIGHT:]id:IMAGE_ID added to the query, e.g. 2:sunset"
SUBTRACT_HELP = "Query arithmetic (repeatable): [WEIGHT:]TEXT or [WEIGHT:]id:IMAGE_ID subtracted from the query"
PROBES_HELP = "ANN effort for this query: IVF lists probed or HNSW efSearch (default: the index's setting)"


@dataclass(frozen=True)
class SearchParams:
    q: Optional[str]
    k: int
    to: str
    weight: float
    min_score: Optional[float]
    under: Optional[str]
    glob: Optional[str]
    exclude_self: bool
    probes: Optional[int]
    after: Optional[str]
    before: Optional[str]
    camera: Optional[str]
    near: Optional[str]
    km: Optional[float]
    add: list[str]
    subtract: list[str]

    @property
    def text(self) -> Optional[str]:
        return self.q if self.q and self.q.strip() else None

    def photo(self) -> PhotoFilter:
        return PhotoFilter.make(self.after, self.before, self.camera, self.near, self.km)

    def terms(self):
        """Query terms from HTTP parameters: text or id:N, never a path on the server."""
        if len(self.add) + len(self.subtract) > MAX_TERMS:
            raise RetrievalError(f"at most {MAX_TERMS} add/subtract terms")
        return parse_terms(
            [a for a in self.add if a.strip()], [x for x in self.subtract if x.strip()], allow_paths=False
        )

    def search_kwargs(self) -> dict:
        """The keyword arguments of the service's search that come straight from these parameters."""
        return dict(
            weight=self.weight,
            to=self.to,
            k=self.k,
            min_score=self.min_score,
            under=self.under or None,
            glob=self.glob or None,
            exclude_self=self.exclude_self,
            probes=self.probes,
        )


def search_params(P, weight_help: str, exclude_self_help: str):
    """A FastAPI dependency reading SearchParams as `P` parameters (fastapi.Query or fastapi.Form)."""

    def read(
        q: Optional[str] = P(None, max_length=2000, description="Query text"),
        k: int = P(10, ge=1, le=MAX_K),
        to: Literal["images", "captions"] = P("images"),
        weight: float = P(0.5, ge=0.0, le=1.0, description=weight_help),
        min_score: Optional[float] = P(None, ge=-1.0, le=1.0),
        under: Optional[str] = P(None, max_length=4096),
        glob: Optional[str] = P(None, max_length=1024),
        exclude_self: bool = P(False, description=exclude_self_help),
        probes: Optional[int] = P(None, ge=1, le=65536, description=PROBES_HELP),
        after: Optional[str] = P(None, max_length=40, description=AFTER_HELP),
        before: Optional[str] = P(None, max_length=40, description=BEFORE_HELP),
        camera: Optional[str] = P(None, max_length=200, description=CAMERA_HELP),
        near: Optional[str] = P(None, max_length=80, description=NEAR_HELP),
        km: Optional[float] = P(None, gt=0, le=40075, description=KM_HELP),
        add: list[str] = P([], max_length=2000, description=ADD_HELP),
        subtract: list[str] = P([], max_length=2000, description=SUBTRACT_HELP),
    ) -> SearchParams:
        return SearchParams(
            q,
            k,
            to,
            weight,
            min_score,
            under,
            glob,
            exclude_self,
            probes,
            after,
            before,
            camera,
            near,
            km,
            add,
            subtract,
        )

    return read


query_params = search_params(
    Query, "Image share of a composite (id + q) query", "With id: leave out that image and identical copies"
)
form_params = search_params(Form, "Image share of a composite query", "Leave out indexed copies of the uploaded file")
