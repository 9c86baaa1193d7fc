"""A client of the OCI distribution API, for cache entries that move between hosts through a
registry: manifests by tag, blobs pushed from and pulled into files (streamed, never whole
in memory; a pull resumes a partial file and is verified against its digest before it is
put in place), tags. Everything a registry sends is bounded and checked."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests

from ..errors import DigestMismatch, RegistryError, RegistryUnavailable
from .auth import Authenticator
from .credentials import find_credentials
from .transport import Transient, Transport

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
#: A manifest larger than this is refused (the distribution spec lets registries do the same).
MANIFEST_LIMIT = 4 << 20
#: A page of tags larger than this is refused; at most this many pages are followed.
TAGS_LIMIT = 4 << 20
TAGS_PAGES = 1000
#: A blob transfer is given ``attempts * timeout`` plus the time it takes at this rate.
SLOWEST_RATE = 256 << 10
CHUNK = 1 << 20

_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])"
_REFERENCE = re.compile(rf"({_HOST}(?::[0-9]{{1,5}})?)/([a-z0-9][a-z0-9._/-]*)")
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_LOCAL = {"localhost", "127.0.0.1", "[::1]"}


@dataclass(frozen=True)
class Reference:
    """A repository of a registry: ``127.0.0.1:5000/vm-cache`` is host ``127.0.0.1:5000``,
    repository ``vm-cache``."""

    host: str
    repository: str

    @classmethod
    def parse(cls, text: str) -> Reference:
        """``"ghcr.io/acme/vm-cache"``, ``"localhost:5000/a/b"`` -> a Reference; anything
        else (no host, a tag, a scheme, upper case) raises RegistryError naming the form."""
        match = _REFERENCE.fullmatch(text.strip())
        host = match.group(1) if match else ""
        if (match is None or not ("." in host or ":" in host or host == "localhost")
                or not all(_COMPONENT.fullmatch(part)
                           for part in match.group(2).split("/"))):
            raise RegistryError(
                f"registry reference {text!r} is not of the form HOST[:PORT]/REPOSITORY "
                f"(e.g. ghcr.io/acme/vm-cache or 127.0.0.1:5000/vm-cache): no scheme, no tag, "
                f"a host with a dot or a port, lower-case repository path")
        return cls(host, match.group(2))

    def __str__(self) -> str:
        return f"{self.host}/{self.repository}"

    @property
    def local(self) -> bool:
        """Whether the host is this machine (where plain HTTP is the default)."""
        return self.host.rsplit(":", 1)[0] in _LOCAL or self.host in _LOCAL


def check_digest(digest: str) -> None:
    if not _DIGEST.fullmatch(digest):
        raise RegistryError(f"digest {digest[:100]!r} is not of the form sha256:<64 hex "
                            f"digits>: only sha256 digests are used")


def _check_tag(tag: str) -> None:
    if not (_TAG.fullmatch(tag) or _DIGEST.fullmatch(tag)):
        raise RegistryError(f"tag {tag[:150]!r} is not a valid tag (letters, digits, '_', "
                            f"'.', '-'; at most 128, not starting with '.' or '-')")


class _FileBody:
    """A file sent as a request body in chunks, with a known length (so requests sends a
    Content-Length rather than chunked encoding), reporting new bytes to ``advance``."""

    def __init__(self, path: Path, size: int, advance: Callable[[int], None],
                 deadline: float, late: Callable[[], Exception]) -> None:
        self.path, self.size, self.advance = path, size, advance
        self.deadline, self.late = deadline, late

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        with self.path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                if time.monotonic() > self.deadline:
                    raise self.late()
                self.advance(len(chunk))
                yield chunk


class _Progress:
    """Reports to ``advance`` only bytes beyond the most already reported: a restarted
    transfer does not count its bytes twice."""

    def __init__(self, advance: Callable[[int], None] | None, start: int = 0) -> None:
        self.target, self.done, self.reported = advance, 0, start

    def restart(self, at: int = 0) -> None:
        self.done = at

    def __call__(self, count: int) -> None:
        self.done += count
        if self.done > self.reported:
            if self.target is not None:
                self.target(self.done - self.reported)
            self.reported = self.done


class Registry:
    """One repository of an OCI registry (``SANDBOX_REGISTRY``)."""

    def __init__(self, reference: str | Reference, *, insecure: bool | None = None,
                 timeout: float = 30.0, attempts: int = 4, auth_file: Path | None = None
                 ) -> None:
        self.reference = (reference if isinstance(reference, Reference)
                          else Reference.parse(reference))
        if insecure is None:
            insecure = (self.reference.local
                        or os.environ.get("SANDBOX_REGISTRY_INSECURE", "") == "1")
        self.host, self.repository = self.reference.host, self.reference.repository
        self.transport = Transport(self.host, secure=not insecure, timeout=timeout,
                                   attempts=attempts)
        self.auth = Authenticator(self.transport,
                                  lambda: find_credentials(self.host, auth_file))
        self.transport.auth = self.auth
        self.pull_scope = f"repository:{self.repository}:pull"
        self.push_scope = f"repository:{self.repository}:pull,push"

    def __repr__(self) -> str:
        return f"Registry({str(self.reference)!r}, base={self.transport.base!r})"

    def _path(self, kind: str, name: str = "") -> str:
        return f"/v2/{self.repository}/{kind}/{name}"

    def ping(self) -> str:
        """Check that the registry answers and accepts our credentials: a one-line
        description of how; RegistryUnavailable or RegistryAuthError when not."""
        response = self.transport.request("GET", "/v2/", scope="")
        response.close()
        if response.status_code != 200:
            raise self.transport.status_error(response, "the API (/v2/)")
        return f"{self.host} answers, {self.auth.describe()}"

    def manifest(self, tag: str) -> tuple[dict[str, Any], str] | None:
        """The OCI image manifest tagged ``tag`` and its digest, or None when there is no
        such tag. Its bytes are checked against the digest the registry gives."""
        _check_tag(tag)

        def fetch() -> tuple[dict[str, Any], str] | None:
            response = self.transport.request(
                "GET", self._path("manifests", tag), scope=self.pull_scope, stream=True,
                headers={"Accept": OCI_MANIFEST}, retry=False)
            if response.status_code == 404:
                response.close()
                return None
            if response.status_code != 200:
                raise self.transport.status_error(response, f"manifest {tag}")
            claimed = response.headers.get("Docker-Content-Digest")
            data = self.transport.read_bounded(response, MANIFEST_LIMIT, f"manifest {tag}")
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            expected = tag if _DIGEST.fullmatch(tag) else claimed
            if expected and expected != digest:
                raise DigestMismatch(
                    f"manifest {tag} from {self.reference} should have digest {expected}, "
                    f"it had {digest}: it was discarded; push it again, or check what "
                    f"stands between this host and the registry")
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                raise RegistryError(f"manifest {tag} from {self.reference} is not a JSON "
                                    f"object: was it pushed by something else?")
            return parsed, digest

        return self.transport.retrying(fetch)

    def put_manifest(self, tag: str, manifest: dict[str, Any]) -> str:
        """Tag ``manifest`` as ``tag``; its digest."""
        _check_tag(tag)
        data = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        if len(data) > MANIFEST_LIMIT:
            raise RegistryError(f"manifest {tag} is {len(data)} bytes, more than the "
                                f"{MANIFEST_LIMIT} a registry is asked to take")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        media_type = manifest.get("mediaType") or OCI_MANIFEST
        response = self.transport.request(
            "PUT", self._path("manifests", tag), scope=self.push_scope, body=lambda: data,
            headers={"Content-Type": str(media_type)})
        if response.status_code != 201:
            raise self.transport.status_error(response, f"manifest {tag}")
        response.close()
        claimed = response.headers.get("Docker-Content-Digest")
        if claimed and claimed != digest:
            raise DigestMismatch(f"registry {self.host} stored manifest {tag} as {claimed}, "
                                 f"it should have digest {digest}: is it the right registry?")
        return digest

    def blob_size(self, digest: str, *, scope: str | None = None) -> int | None:
        """The size of blob ``digest`` in the repository, or None when it has none."""
        check_digest(digest)
        response = self.transport.request("HEAD", self._path("blobs", digest),
                                          scope=scope or self.pull_scope)
        response.close()
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self.transport.status_error(response, f"blob {digest}")
        length = response.headers.get("Content-Length", "")
        if not length.isdigit():
            raise RegistryError(f"registry {self.host} gave no size for blob {digest}")
        return int(length)

    def push_blob(self, path: Path, digest: str, *,
                  advance: Callable[[int], None] | None = None,
                  mount_from: str | None = None) -> bool:
        """Upload the file ``path`` as blob ``digest``, streamed from the file. Nothing is
        sent when the repository has it already, or when it could be mounted from
        repository ``mount_from`` of the same registry: True only when it was uploaded. A
        dropped upload starts again, within the attempts and a deadline."""
        check_digest(digest)
        if self.blob_size(digest, scope=self.push_scope) is not None:
            return False
        size = path.stat().st_size
        progress = _Progress(advance)
        seconds = self._seconds(size)
        deadline = time.monotonic() + seconds

        def late() -> Exception:
            return RegistryUnavailable(f"registry {self.host} did not take blob {digest} "
                                       f"({size} bytes) within {seconds:.0f} s")
        location: str | None = None
        if mount_from is not None and mount_from != self.repository:
            Reference.parse(f"{self.host}/{mount_from}")
            query = urlencode({"mount": digest, "from": mount_from})
            response = self.transport.request(
                "POST", f"{self._path('blobs', 'uploads')}/?{query}",
                scope=f"{self.push_scope} repository:{mount_from}:pull")
            response.close()
            if response.status_code == 201:
                return False
            if response.status_code == 202 and response.headers.get("Location"):
                location = urljoin(self.transport.base + "/", response.headers["Location"])

        def upload() -> None:
            nonlocal location
            start, location = location or self._start_upload(), None
            progress.restart()
            separator = "&" if urlsplit(start).query else "?"
            response = self.transport.request(
                "PUT", f"{start}{separator}{urlencode({'digest': digest})}",
                scope=self.push_scope, body=lambda: _FileBody(path, size, progress, deadline, late),
                headers={"Content-Type": "application/octet-stream"}, retry=False)
            response.close()
            if response.status_code == 400 and "DIGEST_INVALID" in response.text:
                raise DigestMismatch(f"{path} should have digest {digest}, the registry "
                                     f"{self.host} found otherwise: the file changed since "
                                     f"it was hashed; pack it again")
            if response.status_code != 201:
                raise self.transport.status_error(response, f"upload of blob {digest}")

        self.transport.retrying(upload, seconds=seconds)
        return True

    def _start_upload(self) -> str:
        response = self.transport.request("POST", self._path("blobs", "uploads") + "/",
                                          scope=self.push_scope, retry=False)
        response.close()
        location = response.headers.get("Location")
        if response.status_code != 202 or not location:
            raise self.transport.status_error(response, "an upload")
        return urljoin(self.transport.base + "/", location)

    def pull_blob(self, digest: str, size: int, dest: Path, *,
                  advance: Callable[[int], None] | None = None) -> None:
        """Download blob ``digest`` of ``size`` bytes into ``dest``: streamed into
        ``dest.part`` (resumed with a Range request when that exists), verified over the
        whole file, then renamed into place. More bytes than ``size`` or another digest
        raise DigestMismatch and remove the partial file; the whole transfer has a deadline."""
        check_digest(digest)
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        hasher = hashlib.sha256()
        if have:
            with part.open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    hasher.update(chunk)
        progress = _Progress(advance, start=have)
        progress.restart(have)
        seconds = self._seconds(size)
        deadline = time.monotonic() + seconds

        def fetch() -> None:
            nonlocal have, hasher
            if have == size:
                return
            # identity: a compressed answer would have other offsets than the blob's
            headers = {"Accept-Encoding": "identity"}
            if have:
                headers["Range"] = f"bytes={have}-"
            response = self.transport.request("GET", self._path("blobs", digest),
                                              scope=self.pull_scope, headers=headers,
                                              stream=True, retry=False)
            with response:
                if response.status_code == 416:
                    return  # nothing beyond what we have: the digest check tells
                resumed = response.status_code == 206 and response.headers.get(
                    "Content-Range", "").startswith(f"bytes {have}-")
                if response.status_code in (200, 206) and not resumed:
                    have, hasher = 0, hashlib.sha256()  # the whole blob, from its start
                    progress.restart()
                    if response.status_code == 206:
                        part.unlink(missing_ok=True)
                        raise Transient("the registry answered another range than asked")
                elif response.status_code != 206:
                    raise self.transport.status_error(response, f"blob {digest}")
                with part.open("r+b" if have else "wb") as handle:
                    handle.seek(have)
                    handle.truncate()
                    try:
                        for chunk in response.iter_content(CHUNK):
                            if have + len(chunk) > size:
                                raise self._mismatch(digest, size, part, "more than "
                                                     f"{size} bytes")
                            handle.write(chunk)
                            hasher.update(chunk)
                            have += len(chunk)
                            progress(len(chunk))
                            if time.monotonic() > deadline:
                                raise RegistryUnavailable(
                                    f"registry {self.host} did not send blob {digest} "
                                    f"within {seconds:.0f} s ({have} of {size} bytes, kept "
                                    f"in {part} for the next pull to resume)")
                    except requests.RequestException as error:
                        raise Transient(f"the connection dropped: {error}"[:200]) from None
                    finally:
                        handle.flush()
                        os.fsync(handle.fileno())

        self.transport.retrying(fetch, seconds=seconds)
        found = "sha256:" + hasher.hexdigest()
        if found != digest or have != size:
            raise self._mismatch(digest, size, part, f"{have} bytes with digest {found}")
        os.replace(part, dest)

    def _mismatch(self, digest: str, size: int, part: Path, had: str) -> DigestMismatch:
        part.unlink(missing_ok=True)
        return DigestMismatch(
            f"blob from {self.reference} should have digest {digest} ({size} bytes), it had "
            f"{had}: it was discarded; pull again, and if it happens again the registry's "
            f"copy is damaged: push it again")

    def _seconds(self, size: int) -> float:
        timeout, attempts = self.transport.timeout, self.transport.attempts
        return timeout * attempts + size / SLOWEST_RATE

    def tags(self) -> list[str]:
        """The repository's tags (all pages); empty when the repository does not exist."""
        found: list[str] = []
        url: str | None = self.transport.url(self._path("tags", "list"))

        def page(url: str) -> str | None:
            response = self.transport.request("GET", url, scope=self.pull_scope, stream=True,
                                              retry=False)
            if response.status_code == 404:
                response.close()
                return None
            if response.status_code != 200:
                raise self.transport.status_error(response, "the tag list")
            following = response.links.get("next", {}).get("url")
            try:
                body = json.loads(self.transport.read_bounded(response, TAGS_LIMIT, "tags"))
                found.extend(str(tag) for tag in body.get("tags") or [])
            except (ValueError, AttributeError, TypeError):
                raise RegistryError(f"registry {self.host} sent a tag list that is not "
                                    f"JSON of the expected form") from None
            if not following:
                return None
            following = urljoin(self.transport.base + "/", following)
            if not following.startswith(self.transport.base + "/"):
                raise RegistryError(f"registry {self.host} sent for its next tags to "
                                    f"another host ({following[:100]}): not followed")
            return following

        for _ in range(TAGS_PAGES):
            if url is None:
                return found
            url = self.transport.retrying(partial(page, url))
        raise RegistryError(f"registry {self.host} sent more than {TAGS_PAGES} pages of tags")
