"""HTTP robustness around huggingface_hub's requests: retries with backoff, and deadlines.

A hub request can fail in ways that clear (429 with Retry-After, 5xx, refused or reset connections,
truncated bodies, stalls) and in ways that do not (404, a redirect loop); :func:`with_retries` retries
the first kind with exponential backoff and turns both into one line naming the request. A stall is
cut by huggingface_hub's read timeout (:func:`download_timeout`); a drip, a server sending a byte now
and then so that no read ever times out, by a minimum transfer rate (:func:`minimum_rate`).
"""

from __future__ import annotations

import importlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from huggingface_hub import constants

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class HubUnavailable(OSError):
    """A hub request kept failing with transient errors until the attempts ran out (or cannot succeed)."""


class SlowTransfer(TimeoutError):
    """A response body arrived slower than the minimum transfer rate (a drip no read timeout catches)."""


def _redirect_loop(exc: BaseException) -> BaseException | None:
    """The redirect-loop error (httpx's TooManyRedirects) in ``exc``'s cause chain, if any."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if type(seen).__name__ == "TooManyRedirects":
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures (refused, reset, truncated body, timeout) of the HTTP client the
    installed huggingface_hub uses (httpx2 from version 2, httpx before) and of the stdlib."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _transient(exc: BaseException) -> bool:
    """Worth retrying: HTTP 429/5xx, or a transport error (not in offline mode), here or in its cause
    chain (huggingface_hub wraps a failed metadata request in LocalEntryNotFoundError). The first
    HTTP status met decides (a 404 wrapped the same way is not transient)."""
    transport = _transport_errors()
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        status = _status(seen)
        if status is not None:
            return status in RETRY_STATUS
        if isinstance(seen, transport):
            return not constants.HF_HUB_OFFLINE
        seen = seen.__cause__ or seen.__context__
    return False


def with_retries(
    call: Callable[[], T],
    *,
    attempts: int = 6,
    backoff: float = 2.0,
    sleep: Callable[[float], None] | None = None,
    what: str = "hub request",
) -> T:
    """Run ``call``, retrying on HTTP 429/5xx and connection errors (refused, reset, truncated, timed
    out) with exponential backoff + jitter, or the server's Retry-After. When the attempts run out,
    raises :class:`HubUnavailable` naming ``what`` and the last error; other errors pass through."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - filtered just below
            loop = _redirect_loop(exc)
            if loop is not None:  # a misconfigured endpoint or proxy: retrying cannot help
                raise HubUnavailable(f"{what}: the hub answered with a redirect loop ({' '.join(str(loop).split())}); "
                                     "check HF_ENDPOINT and any proxy (HTTPS_PROXY) between you and the hub") from exc
            if not _transient(exc):
                raise
            status = _status(exc)
            if attempt == attempts - 1:
                last = " ".join(str(exc).split())[:300] or type(exc).__name__
                raise HubUnavailable(f"{what} failed {attempts} times; last error: {type(exc).__name__}: {last}") \
                    from exc
            retry_after = getattr(getattr(exc, "response", None), "headers", {}).get("retry-after")
            delay = float(retry_after) if retry_after and str(retry_after).isdigit() else backoff * 2**attempt
            delay *= 1 + 0.25 * random.random()
            log.warning("%s failed (%s); retry %d/%d in %.1f s", what, status or type(exc).__name__,
                        attempt + 1, attempts - 1, delay)
            (sleep or time.sleep)(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# --- deadlines ---------------------------------------------------------------------------------


@contextmanager
def download_timeout(seconds: float) -> Iterator[None]:
    """huggingface_hub reads its download read-timeout (HF_HUB_DOWNLOAD_TIMEOUT) from ``constants``
    on each download; set it for the fetch and put the user's value back after."""
    previous = constants.HF_HUB_DOWNLOAD_TIMEOUT
    constants.HF_HUB_DOWNLOAD_TIMEOUT = seconds
    try:
        yield
    finally:
        constants.HF_HUB_DOWNLOAD_TIMEOUT = previous


DEFAULT_MIN_RATE = 100_000.0  # bytes per second: pythia-1.4b's 2.9 GB would take 8 hours at this rate


def _rate_checked(stream: Iterable[bytes], min_rate: float, window: float, url: object) -> Iterator[bytes]:
    """The chunks of a response body, failing with :class:`SlowTransfer` once a window of ``window``
    seconds has brought fewer than ``min_rate`` bytes per second."""
    start, received = time.monotonic(), 0
    for chunk in stream:
        received += len(chunk)
        elapsed = time.monotonic() - start
        if elapsed >= window:
            if received < min_rate * elapsed:
                raise SlowTransfer(f"{received} bytes in {elapsed:.0f} s from {url}, below the minimum transfer rate "
                                   f"of {min_rate:.0f} bytes/s (fetch.min_rate)")
            start, received = time.monotonic(), 0
        yield chunk


@contextmanager
def minimum_rate(min_rate: float, window: float) -> Iterator[None]:
    """Within the block, every response body huggingface_hub reads must arrive at ``min_rate`` bytes/s
    or more, measured over windows of ``window`` seconds.

    Why ours: a server that sends a byte every few seconds never trips a read timeout (each read
    returns), and huggingface_hub has no deadline or minimum rate; a drip would hold the fetch for
    days. The check wraps the transport of the client huggingface_hub's own factory makes (its
    ``set_client_factory``, the documented hook; the previous factory is put back after), so
    redirects, proxies and headers stay the library's.
    """
    from huggingface_hub.utils import _http

    previous = _http._GLOBAL_CLIENT_FACTORY
    httpx = getattr(_http, "httpx2", None) or _http.httpx  # the client library: httpx2 (hub 2.x) or httpx (1.x)

    class Stream(httpx.SyncByteStream):
        def __init__(self, inner, url):
            self.inner, self.url = inner, url

        def __iter__(self) -> Iterator[bytes]:
            return _rate_checked(self.inner, min_rate, window, self.url)

        def close(self) -> None:
            self.inner.close()

    class Transport(httpx.BaseTransport):
        def __init__(self, inner):
            self.inner = inner

        def handle_request(self, request):
            response = self.inner.handle_request(request)
            response.stream = Stream(response.stream, request.url)
            return response

        def close(self) -> None:
            self.inner.close()

    def factory():
        client = previous()
        client._transport = Transport(client._transport)  # httpx keeps no public setter for these
        client._mounts = {pattern: Transport(t) if t is not None else t for pattern, t in client._mounts.items()}
        return client

    _http.set_client_factory(factory)
    try:
        yield
    finally:
        _http.set_client_factory(previous)
