"""HTTP to one registry: every request with a timeout and the CA chosen for it, bounded
retries with backoff for what may pass (connection errors, 5xx, 429) and none for the rest,
authentication through whatever answers :class:`Authorizer`, and failures turned into
errors that name the registry and the fix."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import requests
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)
from tenacity.stop import stop_base

from ..errors import RegistryAuthError, RegistryError, RegistryNotFound, RegistryUnavailable

T = TypeVar("T")

#: How much of an error answer is read to show the registry's own words.
ERROR_LIMIT = 64 << 10
#: Backoff between attempts: 0.25 s, 0.5 s, 1 s... at most 4 s.
_WAIT = wait_exponential(multiplier=0.25, min=0.25, max=4)


class Transient(Exception):
    """A failure another attempt may not meet: the connection failed or dropped, a timeout,
    a 5xx or 429 answer. ``cause`` says which, for the error raised when attempts run out."""

    def __init__(self, cause: str, *, answered: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.answered = answered


class Authorizer(Protocol):
    """What the transport needs from authentication (see :mod:`.auth`)."""

    def header(self, scope: str) -> str | None:
        """The Authorization header for ``scope`` (``repository:R:pull``), or None."""

    def challenged(self, challenge: str, scope: str, *, again: bool) -> None:
        """A 401 with ``challenge`` (its WWW-Authenticate); prepare what answers it, or
        raise RegistryAuthError when nothing would (``again``: it was already answered)."""


def ca_bundle() -> str | bool:
    """The CA file for TLS to a registry: REQUESTS_CA_BUNDLE, else SSL_CERT_FILE, else the
    system's. Passed on every request: a Session's own ``verify`` loses to the environment."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or True


def _cause(error: BaseException) -> str:
    """A few words for why a connection failed, from the exception chain."""
    seen: BaseException | None = error
    text = str(error)
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or "Connection refused" in str(seen):
            return "connection refused"
        if isinstance(seen, socket.gaierror) or "Name or service not known" in str(seen):
            return "host name not resolved"
        if isinstance(seen, ConnectionResetError):
            return "connection reset"
        if isinstance(seen, requests.Timeout | TimeoutError) or "timed out" in str(seen):
            return "timed out"
        seen = seen.__cause__ or seen.__context__ or next(
            (arg for arg in getattr(seen, "args", ()) if isinstance(arg, BaseException)),
            None)
    return text[:200]


class Transport:
    """Requests to the registry at ``host`` over HTTPS (``secure``) or plain HTTP."""

    def __init__(self, host: str, *, secure: bool, timeout: float, attempts: int) -> None:
        self.host = host
        self.secure = secure
        self.base = f"{'https' if secure else 'http'}://{host}"
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.verify = ca_bundle() if secure else True
        self.session = requests.Session()
        self.auth: Authorizer | None = None

    def url(self, path: str) -> str:
        return self.base + path

    def send(self, method: str, url: str, *, headers: dict[str, str] | None = None,
             body: Any = None, stream: bool = False, **options: Any) -> requests.Response:
        """One request: a connection failure, timeout, 5xx or 429 as :class:`Transient`, a
        TLS failure as RegistryUnavailable (no retry: it would fail the same way)."""
        try:
            response = self.session.request(method, url, headers=headers, data=body,
                                            stream=stream, timeout=self.timeout,
                                            verify=self.verify, **options)
        except requests.exceptions.SSLError as error:
            raise self.tls_error(error) from None
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as error:
            raise Transient(_cause(error)) from None
        if response.status_code >= 500 or response.status_code == 429:
            response.close()
            raise Transient(f"{response.status_code} {response.reason}", answered=True)
        return response

    def request(self, method: str, path_or_url: str, *, scope: str,
                headers: dict[str, str] | None = None, body: Callable[[], Any] | None = None,
                stream: bool = False, retry: bool = True) -> requests.Response:
        """A request with authentication for ``scope``, answering one 401 challenge; with
        ``retry``, transient failures retried (``body`` makes a fresh body each time)."""
        url = path_or_url if "://" in path_or_url else self.url(path_or_url)

        def once() -> requests.Response:
            for again in (False, True):
                sent = dict(headers or {})
                value = self.auth.header(scope) if self.auth is not None else None
                if value is not None and url.startswith(self.base + "/"):
                    sent["Authorization"] = value
                response = self.send(method, url, headers=sent,
                                     body=body() if body is not None else None, stream=stream)
                if response.status_code != 401 or self.auth is None:
                    return response
                challenge = response.headers.get("WWW-Authenticate", "")
                response.close()
                self.auth.challenged(challenge, scope, again=again)
            raise AssertionError("unreachable: a second 401 raises in challenged()")

        return self.retrying(once) if retry else once()

    def retrying(self, call: Callable[[], T], *, seconds: float | None = None) -> T:
        """``call`` retried on :class:`Transient` with backoff, at most ``attempts`` times
        (and for at most ``seconds`` when given); then RegistryUnavailable."""
        stop: stop_base = stop_after_attempt(self.attempts)
        if seconds is not None:
            stop = stop | stop_after_delay(seconds)
        try:
            for attempt in Retrying(stop=stop, wait=_WAIT, reraise=True,
                                    retry=retry_if_exception_type(Transient)):
                with attempt:
                    return call()
        except Transient as error:
            raise self.unavailable(error) from None
        raise AssertionError("unreachable: Retrying returns or raises")

    def unavailable(self, error: Transient) -> RegistryUnavailable:
        if error.answered:
            return RegistryUnavailable(
                f"registry {self.host} kept failing (it answered {error.cause}, "
                f"{self.attempts} attempts): try again later, or check the registry's logs")
        return RegistryUnavailable(
            f"registry {self.host} did not answer ({error.cause}, {self.attempts} attempts): "
            f"is it running? check SANDBOX_REGISTRY")

    def tls_error(self, error: Exception) -> RegistryUnavailable:
        reason = _cause(error)
        if "CERTIFICATE_VERIFY_FAILED" in str(error):
            reason = "its certificate is not signed by a CA this host trusts"
        bundle = self.verify if isinstance(self.verify, str) else "the system's CAs"
        return RegistryUnavailable(
            f"registry {self.host}: TLS failed ({reason}; CAs from {bundle}): give its CA "
            f"certificate in REQUESTS_CA_BUNDLE or SSL_CERT_FILE, or, for a test registry "
            f"that speaks plain HTTP, set SANDBOX_REGISTRY_INSECURE=1")

    def read_bounded(self, response: requests.Response, limit: int, what: str) -> bytes:
        """The body of ``response``, refused when over ``limit`` bytes (whatever its
        Content-Length says); a dropped connection while reading is :class:`Transient`."""
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            response.close()
            raise RegistryError(f"registry {self.host} sent {what} of {declared} bytes, "
                                f"more than the {limit} allowed: is it the right registry?")
        data = bytearray()
        try:
            for chunk in response.iter_content(64 << 10):
                data += chunk
                if len(data) > limit:
                    raise RegistryError(f"registry {self.host} sent {what} larger than the "
                                        f"{limit} bytes allowed: is it the right registry?")
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as error:
            raise Transient(_cause(error)) from None
        finally:
            response.close()
        return bytes(data)

    def status_error(self, response: requests.Response, what: str) -> RegistryError:
        """The error for an unexpected answer to a request for ``what``, with the registry's
        own error codes when it sent some."""
        status = response.status_code
        try:
            raw = self.read_bounded(response, ERROR_LIMIT, "an error")
        except (RegistryError, Transient, RuntimeError):
            raw = b""
        try:
            detail = "; ".join(f"{item.get('code')}: {item.get('message')}"
                               for item in json.loads(raw).get("errors", [])
                               if isinstance(item, dict))
        except (ValueError, AttributeError):
            detail = ""
        said = f"{status} {response.reason}" + (f", {detail[:300]}" if detail else "")
        if status == 404:
            return RegistryNotFound(f"registry {self.host} has no {what} ({said}): check "
                                    f"the repository name, or push it first")
        if status == 400 and not self.secure and b"HTTPS" in raw[:300]:
            return RegistryError(f"registry {self.host} speaks HTTPS and was asked over plain "
                                 f"HTTP: unset SANDBOX_REGISTRY_INSECURE")
        if status in (401, 403):
            return RegistryAuthError(f"registry {self.host} denied {what} ({said}): check "
                                     f"the account's rights, or run `docker login {self.host}`")
        return RegistryError(f"registry {self.host} refused {what} ({said})")
