"""Reaching the Hugging Face hub: fail fast and clearly when it cannot be reached.

Used by the dataset download (geovote.download) and by the model registry (embed.models) before either
asks the hub client for anything, since the client alone retries for ~45 s when offline.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"
CONNECT_TIMEOUT_S = 3.0  # offline must fail fast: the hub client alone retries for ~45 s


class OfflineError(RuntimeError):
    pass


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT)


def check_online(endpoint: str | None = None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise OfflineError, within `timeout_s`, unless a TCP connection to the hub opens."""
    endpoint = endpoint or hub_endpoint()
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise OfflineError("HF_HUB_OFFLINE is set: unset it to download OSV-5M from the hub")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise OfflineError(
            f"cannot reach the Hugging Face hub at {endpoint} ({e.__class__.__name__}: {e}). "
            "Downloading OSV-5M needs a network connection; offline, use the bundled sample "
            "(python -m geovote.sample) or a copy of OSV-5M made elsewhere (--no-download)."
        ) from None
