"""Load test of retrieve.serve on loopback: N concurrent clients posting sample images for T seconds.

    python -m benchmark.serve_load [--index DIR] [--clients 16] [--seconds 60]

Starts the server in a subprocess on a free 127.0.0.1 port, waits for /health, then each client thread
posts test images of the sample in turn (one keep-alive connection each) until the time is up. Prints
requests, failures, requests/s and latency percentiles; exits 1 if any request failed. Bounded: at most
--seconds of load and --max-requests requests in all.
"""
from __future__ import annotations

import argparse
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.serve_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-requests", type=int, default=200_000)
    args = ap.parse_args(argv)
    from geovote.paths import default_sample_root

    images = sorted((default_sample_root() / "images" / "test").rglob("*.jpg"))[:256]
    if not images:
        print("error: no sample test images: run python -m embed.build first", file=sys.stderr)
        return 2
    payloads = [multipart(p.name, p.read_bytes()) for p in images]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "retrieve.serve", "--port", str(port)]
    if args.index:
        cmd += ["--index", str(args.index)]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    try:
        deadline = time.time() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    print(f"error: the server did not start: {server.stderr.read().decode()[-2000:]}",
                          file=sys.stderr)
                    return 2
                time.sleep(0.3)
        stop_at = time.perf_counter() + args.seconds

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            j = i
            while time.perf_counter() < stop_at:
                with lock:
                    if len(latencies) + len(failures) >= args.max_requests:
                        return
                body, ctype = payloads[j % len(payloads)]
                j += args.clients
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/locate", body=body, headers={"Content-Type": ctype})
                    r = conn.getresponse()
                    r.read()
                    ok = r.status == 200
                    why = f"HTTP {r.status}"
                except (OSError, http.client.HTTPException) as e:
                    ok, why = False, repr(e)
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                with lock:
                    (latencies.append(time.perf_counter() - t0) if ok else failures.append(why))

        t_start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
    finally:
        server.terminate()
        server.wait(timeout=10)
    lat_ms = np.array(latencies) * 1000
    n = len(latencies) + len(failures)
    print(f"{args.clients} clients for {wall:.0f} s on loopback: {n:,} requests, {len(failures)} failed, "
          f"{len(latencies) / wall:.1f} requests/s")
    if len(lat_ms):
        print(f"latency ms: p50 {np.percentile(lat_ms, 50):.0f}, p95 {np.percentile(lat_ms, 95):.0f}, "
              f"p99 {np.percentile(lat_ms, 99):.0f}, max {lat_ms.max():.0f}")
    if failures:
        print(f"failures (first 5): {failures[:5]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
