"""`retrieval serve`: a small web UI and JSON API over one index (FastAPI + uvicorn).

    from retrieval.server.app import create_app
    app = create_app("~/photos.idx")          # any ASGI server; `serve()` runs uvicorn

Endpoints (the OpenAPI schema is at /openapi.json):

    GET  /                      the page (retrieval/static/)
    GET  /api/info              index info, the keys of `retrieval info --json`
    GET  /api/search?q=&id=     text search, "more like this" by an indexed image id, or both (composite)
    POST /api/search            multipart upload `image` (+ optional `q`, `weight`): image or composite search
    GET  /duplicates            the near-duplicates page
    GET  /api/duplicates        groups of near-duplicate photos (?threshold=0.95&limit=&offset=)
    GET  /api/search?...&add=&subtract=&after=&before=&camera=&near=&km=   query arithmetic and photo filters
    GET  /thumb/{id}            JPEG thumbnail of an indexed image, made on demand, cached under <index>/thumbs/
    GET  /file/{id}             the original file of an indexed image

Safety: binds 127.0.0.1 by default; files and thumbnails are looked up by numeric id in the index, never by a
client-supplied path, and only while the file at that path is still the one indexed (retrieval/server/served_files.py:
no symlink swapped in, nothing inside the index directory, same size and mtime or same hash), read from the
descriptor that was checked; requests whose Host header is not a loopback name are refused unless the server was
started on another interface (DNS-rebinding guard); uploads are capped (20 MB by default, 413 beyond) and
decoded reduced under a pixel cap, two at a time (retrieval/images.py load_upload; a non-image is a 400).
HEAD is answered like GET, without the body.

Threading: uvicorn runs the sync endpoints on a thread pool. One Searcher (one SQLite connection, opened with
check_same_thread=False, FAISS indexes and the encoder) is shared and every use of it holds one lock, so
queries are serialised; thumbnail decoding and file streaming happen outside the lock.
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
import os
import time
from pathlib import Path
from typing import Optional

from retrieval.errors import (
    DatabaseUnavailableError,
    EmptyIndexError,
    ImageDecodeError,
    IndexDamagedError,
    IndexLockedError,
    IndexNotFoundError,
    ModelMismatchError,
    OfflineWeightsError,
    RetrievalError,
)

try:
    from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise RetrievalError(
        f"the web server needs the [serve] extra ({e.name} is missing): pip install 'retrieval-engine[serve]'"
    ) from None

from retrieval.server.guard import LOOPBACK_NAMES, TEST_HOST, _error, _Guard, _HeadAsGet, is_loopback
from retrieval.server.params import SearchParams, form_params, query_params  # noqa: E402 - after the [serve] check
from retrieval.server.service import THUMB_SIZE, NotFound, TooLarge, _Service, handle_database_errors, log

STATIC_DIR = Path(__file__).with_name("static")
DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
MULTIPART_SLACK = 64 * 1024  # form fields and multipart boundaries around the uploaded file


# RetrievalError subclass -> HTTP status; any other RetrievalError is the client's fault (400).
STATUS = {
    NotFound: 404,
    IndexNotFoundError: 404,
    TooLarge: 413,
    EmptyIndexError: 409,
    ModelMismatchError: 409,
    IndexLockedError: 503,
    IndexDamagedError: 503,  # the index, not the request, needs fixing (verify --repair)
    OfflineWeightsError: 503,
    DatabaseUnavailableError: 503,  # PostgreSQL down or restarting: the next request reconnects
    ImageDecodeError: 400,
}


def status_for(exc: RetrievalError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


def _result_dict(r, base: str) -> dict:
    d = r.to_dict()
    image_id = d["id"] if d.get("kind") == "image" else d.get("image_id")
    if image_id is not None:
        h = d.get("hash")
        d["thumb"] = f"{base}/thumb/{image_id}" + (f"?v={h[:12]}" if h else "")
        d["file"] = f"{base}/file/{image_id}"
    return d


def create_app(
    index_dir=None,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    device: str = "auto",
    thumbs_dir=None,
    thumb_size: int = THUMB_SIZE,
    allowed_hosts: Optional[list[str]] = None,
    for_tests: bool = False,
) -> FastAPI:
    """The ASGI app for the index at `index_dir` (default: $RETRIEVAL_INDEX, else the per-user index).

    Opens the index at once (IndexNotFoundError if there is none) but loads no model: the encoder is loaded
    by the first query that needs it. `allowed_hosts`: Host header names accepted (default: loopback names
    only; ["*"] accepts any, for a server bound to another interface). `for_tests`: also accept the
    Host header "testserver" of Starlette's TestClient (never in `serve`).
    """
    from contextlib import asynccontextmanager

    service = _Service(index_dir, device, thumbs_dir, thumb_size)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.remove_temp_thumbs()

    # no /docs or /redoc: FastAPI's pages load Swagger UI from a CDN, and no installed package ships it
    app = FastAPI(
        title="retrieval",
        description="Search an image index by sentence, by example image, or both.",
        version=_version(),
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.max_upload_bytes = max_upload_bytes
    hosts = list(LOOPBACK_NAMES) if allowed_hosts is None else list(allowed_hosts)
    app.add_middleware(
        _Guard, allowed_hosts=hosts + [TEST_HOST] if for_tests else hosts, max_body=max_upload_bytes + MULTIPART_SLACK
    )
    app.add_middleware(_HeadAsGet)

    # -- errors as JSON ---------------------------------------------------------------------------

    @app.exception_handler(RetrievalError)
    async def _retrieval_error(request: Request, exc: RetrievalError):
        return _error(status_for(exc), str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"not found: {request.url.path}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        details = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body", "path"))
            details.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else e.get("msg", "invalid"))
        return _error(422, "; ".join(details) or "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    handle_database_errors(app, service, status_for, _unexpected)

    # -- page -------------------------------------------------------------------------------------

    page_headers = {
        "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
        "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }

    @app.get("/", include_in_schema=False)
    @app.get("/static/index.html", include_in_schema=False)  # the same page by its file name: the same headers
    def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=page_headers)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # -- API --------------------------------------------------------------------------------------

    @app.get("/api/info", summary="Index info (the keys of `retrieval info --json`)")
    def api_info():
        return {**service.info(), "max_upload_bytes": max_upload_bytes}

    @app.get("/api/search", summary="Search by text, by an indexed image id (more like this), or both")
    def api_search(
        request: Request,
        id: Optional[int] = Query(None, ge=0, le=2**62, description="Id of an indexed image: more like this"),
        p: SearchParams = Depends(query_params),
    ):
        terms = p.terms()
        if p.text is None and id is None and not terms:
            raise RetrievalError("give a query: q=TEXT, id=IMAGE_ID, add=TERM, or several")
        photo = p.photo()
        t0 = time.perf_counter()
        results = service.search(text=p.text, image_id=id, photo=photo, terms=terms, **p.search_kwargs())
        return _results(request, results, t0)

    @app.post("/api/search", summary="Search by an uploaded image, optionally combined with text")
    def api_search_upload(
        request: Request,
        image: UploadFile = File(..., description="Query image"),
        p: SearchParams = Depends(form_params),
    ):
        from retrieval.images import load_upload

        photo = p.photo()
        terms = p.terms()

        data = image.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise TooLarge(f"upload over the {max_upload_bytes} byte limit")
        if not data:
            raise ImageDecodeError("the uploaded file is empty")
        name = os.path.basename(image.filename or "upload")
        buf = io.BytesIO(data)
        buf.name = name
        with service.decodes:  # bounded: a few huge uploads at once must not take all memory
            pil = load_upload(buf)
        t0 = time.perf_counter()
        results = service.search(
            text=p.text,
            image=pil,
            photo=photo,
            terms=terms,
            image_hash=hashlib.sha256(data).hexdigest() if p.exclude_self else None,
            **p.search_kwargs(),
        )
        return _results(request, results, t0)

    @app.get("/duplicates", include_in_schema=False)
    def duplicates_page():
        return FileResponse(STATIC_DIR / "duplicates.html", media_type="text/html; charset=utf-8", headers=page_headers)

    @app.get("/api/duplicates", summary="Groups of near-duplicate photos, best-quality member first")
    def api_duplicates(
        request: Request,
        threshold: float = Query(
            0.95, ge=0.5, le=1.0, description="Cosine similarity at or above which photos are near-duplicates"
        ),
        limit: int = Query(200, ge=1, le=10000, description="Most groups returned (largest groups first)"),
        offset: int = Query(0, ge=0, description="Groups to skip, for paging"),
    ):
        t0 = time.perf_counter()
        groups = service.duplicates(threshold)
        base = request.scope.get("root_path", "").rstrip("/")
        page = groups[offset : offset + limit]
        return {
            "groups": [
                {
                    "members": [
                        {**m, "thumb": f"{base}/thumb/{m['id']}", "file": f"{base}/file/{m['id']}"}
                        for m in g.to_dict()["members"]
                    ]
                }
                for g in page
            ],
            "total": len(groups),
            "threshold": threshold,
            "took_ms": round((time.perf_counter() - t0) * 1000, 1),
        }

    def _results(request: Request, results, t0: float) -> dict:
        base = request.scope.get("root_path", "").rstrip("/")
        return {
            "results": [_result_dict(r, base) for r in results],
            "took_ms": round((time.perf_counter() - t0) * 1000, 1),
        }

    # -- files ------------------------------------------------------------------------------------

    @app.get(
        "/thumb/{image_id}",
        summary="JPEG thumbnail of an indexed image",
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "not in the index"}},
    )
    def thumb(image_id: str):
        row = service.image_row(image_id)
        path, hit = service.thumbnail(row)
        return FileResponse(
            path,
            media_type="image/jpeg",
            headers={
                "Cache-Control": "public, max-age=86400",
                "X-Thumb-Cache": "hit" if hit else "miss",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @app.get(
        "/file/{image_id}",
        summary="The original file of an indexed image",
        responses={200: {"content": {"image/*": {}}}, 404: {"description": "not in the index"}},
    )
    def file(image_id: str, request: Request):
        row = service.image_row(image_id)
        checked = service.checked_file(row)
        media = mimetypes.guess_type(row.path)[0] or "application/octet-stream"
        if not media.startswith("image/"):
            media = "application/octet-stream"
        from email.utils import formatdate

        headers = {
            "Content-Length": str(checked.size),
            "ETag": f'"{row.hash[:32]}"',
            "Last-Modified": formatdate(checked.mtime_ns / 1e9, usegmt=True),
            "Cache-Control": "private, max-age=3600",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        }
        if request.scope.get("retrieval.head"):
            checked.close()
            return Response(media_type=media, headers=headers)
        # streamed from the descriptor that was checked, not from the path again
        return StreamingResponse(checked.chunks(), media_type=media, headers=headers)

    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("retrieval-engine")
    except Exception:
        return "0"


def bind_socket(host: str, port: int):
    """A listening socket on host:port (port 0: a free one), or a RetrievalError saying why not."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise RetrievalError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise RetrievalError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_for(sock) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def serve(
    index_dir=None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    device: str = "auto",
    log_level: str = "warning",
    on_ready=None,
) -> None:
    """Run the server in this thread until Ctrl-C. `on_ready(url, app)` is called once it listens."""
    import uvicorn

    loopback = is_loopback(host)
    app = create_app(
        index_dir, max_upload_bytes=max_upload_bytes, device=device, allowed_hosts=None if loopback else ["*"]
    )
    sock = bind_socket(host, port)
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=log_level in ("info", "debug"))
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready(url_for(sock), app, loopback)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        app.state.service.remove_temp_thumbs()  # also when the lifespan's shutdown never ran
