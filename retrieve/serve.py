"""A local web app and HTTP API: drop a photo, see where it was taken.

    python -m retrieve.serve [--index DIR] [--port 8765]         # then open http://127.0.0.1:8765/

    POST /locate   multipart form, field `image`: the answer of `retrieve.query --json`, plus `neighbours`
                   (the nearest training images: id, latitude, longitude, similarity)
    GET  /health   the index (backbone, size) and readiness
    GET  /docs     the OpenAPI description (FastAPI), /openapi.json its source

Binds 127.0.0.1 only, and answers only requests addressed to 127.0.0.1, localhost or [::1] (add a name
with --allow-host, e.g. behind a reverse proxy). Uploads are read into memory (bounded by --max-upload-mb,
chunked ones too, within 30 s) and never written anywhere; images over --max-megapixels are refused before
they are decoded; nothing is ever fetched from a URL a client sends. Every refusal is a 4xx JSON object
{"error": "..."}. The app itself is retrieve.app.
"""
from __future__ import annotations

import argparse
import socket
import sys

from embed.models import BackboneError
from geovote.config import ConfigError
from geovote.layout import EngineMissing
from index.search import IndexError_
from retrieve.app import (BATCH_WAIT_MS, BODY_TIMEOUT_S, LOCAL_HOSTS, MAX_BATCH, MAX_MEGAPIXELS, MAX_QUEUE,
                          MAX_UPLOAD_MB, create_app)
from retrieve.engine import Engine
from retrieve.share import ShareError, resolve_engine

DEFAULT_PORT = 8765


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retrieve.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default=None,
                    help="index folder (default: the sample's), or a published engine: hf-hub:ORG/NAME[@REV]")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"1-65535 (default {DEFAULT_PORT})")
    ap.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB)
    ap.add_argument("--max-megapixels", type=float, default=MAX_MEGAPIXELS)
    ap.add_argument("--upload-timeout-s", type=float, default=BODY_TIMEOUT_S,
                    help=f"an upload must arrive whole within this (default {BODY_TIMEOUT_S:g})")
    ap.add_argument("--max-batch", type=int, default=MAX_BATCH, help="concurrent uploads answered together")
    ap.add_argument("--batch-wait-ms", type=float, default=BATCH_WAIT_MS,
                    help="how long an upload waits for others to join its batch")
    ap.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                    help="uploads waiting beyond this are answered 503 with Retry-After")
    ap.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="also answer requests whose Host is NAME (repeatable; '*' for any)")
    args = ap.parse_args(argv)
    if not 1 <= args.port <= 65535:
        print(f"error: --port must be between 1 and 65535, got {args.port}", file=sys.stderr)
        return 2
    if min(args.max_upload_mb, args.max_megapixels, args.upload_timeout_s) <= 0:
        print("error: --max-upload-mb, --max-megapixels and --upload-timeout-s must be positive",
              file=sys.stderr)
        return 2
    if args.max_batch < 1 or args.max_queue < 1 or args.batch_wait_ms < 0:
        print("error: --max-batch and --max-queue must be at least 1, --batch-wait-ms at least 0",
              file=sys.stderr)
        return 2
    try:
        with socket.socket() as probe:  # a port in use: say so before loading anything or printing a banner
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", args.port))
    except OSError as e:
        print(f"error: cannot listen on 127.0.0.1:{args.port} ({e.strerror}): is another server running "
              "there? pick another --port", file=sys.stderr)
        return 2
    try:
        layout, published = resolve_engine(args.index)
        engine = Engine(layout.require_index(), model=published)
    except (EngineMissing, IndexError_, BackboneError, ConfigError, ShareError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if engine.untuned_warning():
        print(engine.untuned_warning(), file=sys.stderr)
    import uvicorn

    app = create_app(engine, int(args.max_upload_mb * 2**20), int(args.max_megapixels * 1e6),
                     allowed_hosts=(*LOCAL_HOSTS, *args.allow_host), body_timeout_s=args.upload_timeout_s,
                     max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue)
    print(f"geovote: http://127.0.0.1:{args.port}/  ({engine.index.count:,} images, {engine.index.backbone})")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    from geovote.cli import exit_now

    exit_now(main())
