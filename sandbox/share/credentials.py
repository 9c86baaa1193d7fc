"""Registry credentials, found where docker and podman keep them: ``$REGISTRY_AUTH_FILE``,
``$DOCKER_CONFIG/config.json``, ``~/.docker/config.json``, then podman's
``$XDG_RUNTIME_DIR/containers/auth.json``. An entry is read from ``credHelpers`` (a
``docker-credential-<name>`` program), from ``auths`` (base64 ``auth``, or ``username`` and
``password``, or ``identitytoken``), or from the file's ``credsStore`` helper."""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RegistryAuthError

#: A credential helper that has not answered by then is stopped.
HELPER_SECONDS = 15.0
#: Bounds on what is read from a config file and from a helper's output.
FILE_LIMIT = 1 << 20
HELPER_LIMIT = 64 << 10
#: Docker Hub's entries are kept under its old index address.
_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}


@dataclass(frozen=True)
class Credentials:
    """A user and password (or an identity token, exchanged for registry tokens) for one
    registry, and where they were found (shown in errors)."""

    username: str
    password: str = field(repr=False)
    source: str
    identity_token: str | None = field(default=None, repr=False)


@dataclass
class Lookup:
    """The outcome of looking for a host's credentials: what was found and which files were
    looked at (an authentication error names them)."""

    credentials: Credentials | None
    looked_at: list[Path]

    def where(self) -> str:
        return ", ".join(str(path) for path in self.looked_at) or "no config file"


def auth_files() -> list[Path]:
    """The files docker and podman read credentials from, in the order they are tried."""
    candidates: list[Path] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        candidates.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("DOCKER_CONFIG"):
        candidates.append(Path(os.environ["DOCKER_CONFIG"]) / "config.json")
    candidates.append(Path.home() / ".docker" / "config.json")
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    return candidates


def find_credentials(host: str, auth_file: Path | None = None) -> Lookup:
    """Credentials for registry ``host`` (``"ghcr.io"``, ``"127.0.0.1:5000"``) from
    ``auth_file`` alone when given, else from the first of :func:`auth_files` that has an
    entry for it. A helper that fails or a malformed entry raises RegistryAuthError."""
    files = [auth_file] if auth_file is not None else auth_files()
    looked_at = []
    for path in files:
        if not path.is_file():
            continue
        looked_at.append(path)
        found = _from_file(path, _load(path), host)
        if found is not None:
            return Lookup(found, looked_at)
    return Lookup(None, looked_at or files)


def _load(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = handle.read(FILE_LIMIT + 1)
        if len(data) > FILE_LIMIT:
            raise ValueError(f"larger than {FILE_LIMIT} bytes")
        config = json.loads(data)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        return config
    except (OSError, ValueError) as error:
        raise RegistryAuthError(f"registry credentials file {path} cannot be read ({error}): "
                                f"fix it, or log in again with `docker login`") from None


def _server_key(key: str) -> str:
    """``"https://ghcr.io/v1/"`` -> ``"ghcr.io"``: config keys name a host with or without a
    scheme and a path."""
    key = key.split("://", 1)[-1]
    return key.split("/", 1)[0].lower()


def _matches(key: str, host: str) -> bool:
    server, host = _server_key(key), host.lower()
    return server == host or (server in _DOCKER_HUB and host in _DOCKER_HUB)


def _from_file(path: Path, config: dict[str, Any], host: str) -> Credentials | None:
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if _matches(key, host) and isinstance(helper, str):
                return run_helper(helper, host, path)
    auths = config.get("auths")
    if isinstance(auths, dict):
        for key, entry in auths.items():
            if _matches(key, host) and isinstance(entry, dict):
                found = _from_entry(entry, f"{path} (auths.{key})")
                if found is not None:
                    return found
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        return run_helper(store, host, path, missing_ok=True)
    return None


def _from_entry(entry: dict[str, Any], source: str) -> Credentials | None:
    token = entry.get("identitytoken") or None
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, sep, password = base64.b64decode(entry["auth"], validate=True).decode() \
                .partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise RegistryAuthError(f"the auth entry in {source} is not base64 of "
                                    f"'user:password': log in again with `docker login`")
        return Credentials(user, password, source, token)
    if isinstance(entry.get("username"), str):
        return Credentials(entry["username"], str(entry.get("password", "")), source, token)
    if isinstance(token, str):
        return Credentials("<token>", "", source, token)
    return None


def run_helper(name: str, host: str, config: Path, *, missing_ok: bool = False
               ) -> Credentials | None:
    """Ask ``docker-credential-<name> get`` for ``host``'s credentials (as docker does:
    the server on stdin, JSON on stdout). None when the helper has none and ``missing_ok``."""
    program = f"docker-credential-{name}"
    where = f"credential helper {program} (named in {config})"
    if shutil.which(program) is None:
        raise RegistryAuthError(f"{where} is not on PATH: install it, or remove it from "
                                f"{config} and run `docker login {host}`")
    try:
        result = subprocess.run([program, "get"], input=host.encode(), capture_output=True,
                                timeout=HELPER_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise RegistryAuthError(f"{where} did not answer within {HELPER_SECONDS:.0f} s "
                                f"for {host}: is it waiting for a keyring to be unlocked?"
                                ) from None
    output = result.stdout[:HELPER_LIMIT]
    if result.returncode != 0:
        text = (output or result.stderr[:HELPER_LIMIT]).decode(errors="replace").strip()
        if missing_ok and "not found" in text.lower():
            return None
        raise RegistryAuthError(f"{where} failed for {host} (exit status {result.returncode}: "
                                f"{text[:200]}): run `docker login {host}`")
    try:
        answer = json.loads(output)
        user, secret = answer["Username"], answer["Secret"]
        if not isinstance(user, str) or not isinstance(secret, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise RegistryAuthError(f"{where} gave no Username and Secret for {host}: "
                                f"run `docker login {host}`") from None
    if user == "<token>":
        return Credentials(user, "", where, secret)
    return Credentials(user, secret, where)
