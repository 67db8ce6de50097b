"""Reaching the Hugging Face hub: decide it as huggingface_hub would, and fail fast when there is no route.

    check_online()      # raises OfflineError within a few seconds when the hub cannot be reached

Honours HF_HUB_OFFLINE (offline, no request at all), HF_ENDPOINT (a mirror) and the proxy variables
(HTTPS_PROXY, HTTP_PROXY, NO_PROXY: urllib reads them as requests and httpx do), so a cluster that reaches
the internet only through a proxy is online. Used by the dataset download (geovote.download) and by the
model registry (embed.pretrained) before either asks the hub client for anything, since the client
alone retries for ~45 s when offline. Callers add their own advice (how to get weights, or the data).
"""
from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_ENDPOINT = "https://huggingface.co"
CONNECT_TIMEOUT_S = 3.0  # offline must fail fast: the hub client alone retries for ~45 s
TRUE = ("1", "true", "yes", "on")


class OfflineError(RuntimeError):
    pass


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def check_online(endpoint: str | None = None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise OfflineError unless an HTTP request to the hub gets an answer (any status) within
    `timeout_s`, through the proxy the environment names if any."""
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE:
        raise OfflineError("HF_HUB_OFFLINE is set, so the hub is not asked (unset it to download)")
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise OfflineError(f"HF_ENDPOINT {endpoint!r} is not an http(s) URL")
    proxy = urllib.request.getproxies().get(url.scheme)
    via = f" through the proxy {proxy}" if proxy and not urllib.request.proxy_bypass(url.hostname) else ""
    request = urllib.request.Request(f"{endpoint}/api/models?limit=1", method="HEAD",
                                     headers={"User-Agent": "geovote"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError as e:
        if e.code == 407:
            raise OfflineError(f"the proxy {proxy} refuses the request to {endpoint} (407: it wants "
                               "credentials, e.g. HTTPS_PROXY=http://user:password@host:port)") from None
        return  # the hub answered (rate limit, auth, moved): it is reachable; let the client decide
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise OfflineError(f"cannot reach the Hugging Face hub at {endpoint}{via} ({reason})") from None
