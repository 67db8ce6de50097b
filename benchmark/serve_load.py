"""Load test of retrieve.serve on loopback: 1 client, then N concurrent clients, posting sample images.

    python -m benchmark.serve_load [--index DIR] [--clients 1 16] [--seconds 30] [-- server flags]

Starts the server in a subprocess on a free 127.0.0.1 port, waits for /health, then for each client
count in turn, each client thread posts test images of the sample (one keep-alive connection each) until
the time is up. Prints, side by side, requests/s and latency percentiles per client count, and the ratio
of the last to the first; exits 1 if any request failed. Bounded: at most --seconds of load per count and
--max-requests requests in all. Server flags after `--` (e.g. `-- --max-batch 1` for no batching).
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


def load(port: int, payloads: list, clients: int, seconds: float, max_requests: int) -> dict:
    """`clients` threads posting for `seconds`: requests/s, latency percentiles (ms), failures."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        j = i
        while time.perf_counter() < stop_at:
            with lock:
                if len(latencies) + len(failures) >= max_requests:
                    return
            body, ctype = payloads[j % len(payloads)]
            j += clients
            t0 = time.perf_counter()
            try:
                headers = {"Content-Type": ctype, "Host": "127.0.0.1"}
                conn.request("POST", "/locate", body=body, headers=headers)
                r = conn.getresponse()
                r.read()
                ok, why = r.status == 200, f"HTTP {r.status}"
            except (OSError, http.client.HTTPException) as e:
                ok, why = False, repr(e)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                (latencies.append(time.perf_counter() - t0) if ok else failures.append(why))

    t_start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    lat_ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"clients": clients, "seconds": wall, "requests": len(latencies) + len(failures),
            "failures": failures, "rps": len(latencies) / wall, "p50": np.percentile(lat_ms, 50),
            "p95": np.percentile(lat_ms, 95), "p99": np.percentile(lat_ms, 99), "max": lat_ms.max()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.serve_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=None)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=30.0, help="of load for each client count")
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("server_flags", nargs="*", help="passed to retrieve.serve (after --)")
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
    cmd = [sys.executable, "-m", "retrieve.serve", "--port", str(port), *args.server_flags]
    if args.index:
        cmd += ["--index", str(args.index)]
    import tempfile

    server_log = tempfile.TemporaryFile()  # not a pipe: a server that logs a lot never blocks on it
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=server_log,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rows = []
    try:
        deadline = time.time() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health", headers={"Host": "127.0.0.1"})
                if c.getresponse().status == 200:
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    server_log.seek(0)
                    print(f"error: the server did not start: {server_log.read().decode()[-2000:]}",
                          file=sys.stderr)
                    return 2
                time.sleep(0.3)
        load(port, payloads, 1, 2.0, 50)  # warm-up: caches, first batch
        for n in args.clients:
            rows.append(load(port, payloads, n, args.seconds, args.max_requests))
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"retrieve.serve {' '.join(args.server_flags)} on loopback, {args.seconds:g} s per client count")
    print(f"{'clients':>8} {'requests':>9} {'failed':>7} {'req/s':>8} "
          f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}")
    for r in rows:
        print(f"{r['clients']:>8} {r['requests']:>9,} {len(r['failures']):>7} {r['rps']:>8.1f} "
              f"{r['p50']:>7.0f} {r['p95']:>7.0f} {r['p99']:>7.0f}")
    if len(rows) > 1:
        print(f"requests/s with {rows[-1]['clients']} clients / with {rows[0]['clients']}: "
              f"{rows[-1]['rps'] / rows[0]['rps']:.2f}x")
    failures = [f for r in rows for f in r["failures"]]
    if failures:
        print(f"failures (first 5): {failures[:5]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
