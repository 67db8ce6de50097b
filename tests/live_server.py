"""A real retrieve.serve on a free loopback port, for the tests that need uvicorn itself (browser, raw
sockets). Imported by test modules (pytest puts tests/ on the path)."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, *flags: str, env: dict | None = None, wait_s: float = 90.0, **popen):
    """(process, port): `python -m retrieve.serve --index INDEX FLAGS` listening, or the wait ran out."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "retrieve.serve", "--index", str(index), "--port", str(port),
                             *flags], cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            **popen)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    return proc, port
