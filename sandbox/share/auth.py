"""Answering a registry's authentication challenge: Basic with the user's credentials, or
Bearer with a token per scope from the challenge's realm (``repository:R:pull`` for
reads, ``repository:R:pull,push`` for writes: a token is only used for the scope it was
issued for), anonymous when there are no credentials."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable

from ..errors import RegistryAuthError, RegistryError
from .credentials import Credentials, Lookup
from .transport import Transport

#: A token answer larger than this is refused.
TOKEN_LIMIT = 1 << 20
#: How long a token without ``expires_in`` is used (the distribution spec's default).
DEFAULT_EXPIRY = 60.0
_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]] | None:
    """``'Bearer realm="https://a/token",service="r"'`` -> ``("bearer", {"realm": ...})``."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _PARAM.finditer(rest)}
    return scheme.lower(), params


class Authenticator:
    """The Authorization header for each scope of one registry, learnt from its first
    challenge; credentials looked up (by ``lookup``) only when a challenge asks for them."""

    def __init__(self, transport: Transport, lookup: Callable[[], Lookup]) -> None:
        self.transport = transport
        self.host = transport.host
        self._lookup = lookup
        self._found: Lookup | None = None
        self.scheme: str | None = None
        self.realm = ""
        self.service: str | None = None
        self._challenge_scope: str | None = None
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def found(self) -> Lookup:
        if self._found is None:
            self._found = self._lookup()
        return self._found

    def credentials(self) -> Credentials | None:
        return self.found().credentials

    def header(self, scope: str) -> str | None:
        if self.scheme == "basic":
            found = self.credentials()
            if found is None:
                return None
            pair = f"{found.username}:{found.password}".encode()
            return "Basic " + base64.b64encode(pair).decode()
        if self.scheme == "bearer":
            with self._lock:
                cached = self._tokens.get(scope)
                if cached is not None and cached[1] > time.monotonic():
                    return cached[0]
                token, expiry = self._fetch(scope)
                self._tokens[scope] = (f"Bearer {token}", time.monotonic() + expiry)
                return self._tokens[scope][0]
        return None

    def challenged(self, challenge: str, scope: str, *, again: bool) -> None:
        parsed = parse_challenge(challenge)
        if parsed is None or parsed[0] not in ("basic", "bearer"):
            raise RegistryAuthError(
                f"registry {self.host} answered 401 with a challenge this client cannot "
                f"answer ({challenge[:100]!r}): only Basic and Bearer are supported")
        if again:
            raise self.refused(scope)
        scheme, params = parsed
        if scheme == "basic":
            if self.credentials() is None:
                raise self.missing()
        else:
            realm = params.get("realm", "")
            if not realm.startswith("https://") and not (
                    realm.startswith("http://") and not self.transport.secure):
                raise RegistryAuthError(
                    f"registry {self.host} sends for tokens to {realm[:100]!r}, not an "
                    f"https address: credentials are not sent there; is it the right registry?")
            self.realm, self.service = realm, params.get("service")
            self._challenge_scope = params.get("scope")
            with self._lock:
                self._tokens.pop(scope, None)
        self.scheme = scheme

    def describe(self) -> str:
        """How the registry accepted us, for :meth:`Registry.ping`."""
        if self.scheme is None:
            return "no credentials needed"
        found = self.credentials()
        if found is None:
            return "anonymous access accepted"
        return f"credentials of user {found.username!r} accepted (from {found.source})"

    def missing(self) -> RegistryAuthError:
        return RegistryAuthError(
            f"registry {self.host} asks for credentials and none were found for it (looked "
            f"in {self.found().where()}): run `docker login {self.host}`, or set "
            f"REGISTRY_AUTH_FILE to a file that has them")

    def refused(self, scope: str) -> RegistryAuthError:
        found = self.credentials()
        if found is None:
            return self.missing()
        what = f" for {scope}" if scope else ""
        return RegistryAuthError(
            f"registry {self.host} refused the credentials of user {found.username!r}{what} "
            f"(from {found.source}): check them, or run `docker login {self.host}` again")

    def _fetch(self, scope: str) -> tuple[str, float]:
        """A token for ``scope`` from the realm: (token, seconds it may be used)."""
        scopes = scope.split() if scope else [self._challenge_scope or ""]
        scopes = [item for item in scopes if item]
        found = self.credentials()
        params: dict[str, str | list[str]] = {"scope": scopes}
        if self.service:
            params["service"] = self.service
        if found is not None and found.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": found.identity_token,
                    "client_id": "pytest-qemu-sandbox", "scope": " ".join(scopes)}
            if self.service:
                form["service"] = self.service
            response = self.transport.send("POST", self.realm, body=form, stream=True)
        else:
            auth = (found.username, found.password) if found is not None else None
            response = self.transport.send("GET", self.realm, params=params, auth=auth,
                                           stream=True)
        if response.status_code in (401, 403):
            response.close()
            raise self.refused(scope)
        if response.status_code != 200:
            raise self.transport.status_error(response, f"a token for {scope or 'access'}")
        try:
            answer = json.loads(self.transport.read_bounded(response, TOKEN_LIMIT, "a token"))
            token = answer.get("token") or answer.get("access_token")
            expiry = float(answer.get("expires_in") or DEFAULT_EXPIRY)
            if not isinstance(token, str) or not token:
                raise ValueError("no token")
        except (ValueError, TypeError, AttributeError):
            raise RegistryError(f"registry {self.host}'s token service {self.realm[:100]} "
                                f"answered without a token: is it the right registry?"
                                ) from None
        return token, max(1.0, expiry - 5)
