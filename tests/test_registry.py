"""The OCI registry client against a real registry (Debian's docker-registry, started by
tests/registry.py): blobs and manifests round trip, a pull resumes and refuses damaged
bytes, credentials are found where docker keeps them, failures name their fix. No VMs."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sandbox.errors import (
    DigestMismatch,
    RegistryAuthError,
    RegistryError,
    RegistryNotFound,
    RegistryUnavailable,
)
from sandbox.share.credentials import find_credentials
from sandbox.share.oci import OCI_MANIFEST, Reference, Registry

from .registry import (
    IDENTITY_TOKEN,
    PASSWORD,
    USER,
    CuttingProxy,
    RegistryServer,
    docker_config,
    free_port,
)

SIZE = 6 << 20


def blob(tmp_path: Path, size: int = SIZE, name: str = "blob") -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path, "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_for(layer_digest: str, size: int, config_digest: str) -> dict[str, object]:
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                       "digest": config_digest, "size": 2},
            "layers": [{"mediaType": "application/vnd.sandbox.cache.v1.tar+zstd",
                        "digest": layer_digest, "size": size}]}


@pytest.fixture
def no_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No credentials anywhere docker would look: an empty home and DOCKER_CONFIG."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DOCKER_CONFIG", str(home / ".docker"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return home


def client(server: RegistryServer, tmp_path: Path, repository: str = "vm-cache",
           **options: object) -> Registry:
    config = docker_config(tmp_path / "docker", server.host)
    return Registry(server.reference(repository), auth_file=config, **options)  # type: ignore[arg-type]


# -- references and defaults ---------------------------------------------------------------------

@pytest.mark.parametrize("text, host, repository", [
    ("127.0.0.1:5000/vm-cache", "127.0.0.1:5000", "vm-cache"),
    ("ghcr.io/acme/vm-cache", "ghcr.io", "acme/vm-cache"),
    ("localhost:5000/a/b", "localhost:5000", "a/b"),
    ("localhost/a", "localhost", "a"),
])
def test_references_parse(text: str, host: str, repository: str) -> None:
    assert Reference.parse(text) == Reference(host, repository)


@pytest.mark.parametrize("text", ["vm-cache", "acme/vm-cache", "ghcr.io/acme/vm-cache:latest",
                                  "https://ghcr.io/acme/x", "ghcr.io/Acme/x", "ghcr.io/",
                                  "ghcr.io/a//b", "ghcr.io/a/../b"])
def test_bad_references_name_the_form_expected(text: str) -> None:
    with pytest.raises(RegistryError, match="HOST\\[:PORT\\]/REPOSITORY"):
        Reference.parse(text)


def test_plain_http_only_for_this_machine_or_when_asked(monkeypatch: pytest.MonkeyPatch,
                                                         ) -> None:
    monkeypatch.delenv("SANDBOX_REGISTRY_INSECURE", raising=False)
    assert Registry("127.0.0.1:5000/x").transport.base == "http://127.0.0.1:5000"
    assert Registry("localhost:5000/x").transport.base == "http://localhost:5000"
    assert Registry("ghcr.io/acme/x").transport.base == "https://ghcr.io"
    assert Registry("127.0.0.1:5000/x", insecure=False).transport.base.startswith("https:")
    monkeypatch.setenv("SANDBOX_REGISTRY_INSECURE", "1")
    assert Registry("registry.example:5000/x").transport.base == "http://registry.example:5000"


# -- blobs, manifests, tags ----------------------------------------------------------------------

def test_blob_and_manifest_round_trip(registry: RegistryServer, tmp_path: Path) -> None:
    remote = client(registry, tmp_path, "round-trip")
    assert remote.ping() == (f"{registry.host} answers, credentials of user 'ci' accepted "
                             f"(from {tmp_path / 'docker' / 'config.json'} "
                             f"(auths.{registry.host}))")
    path, digest = blob(tmp_path)
    config, config_digest = tmp_path / "config", ""
    config.write_bytes(b"{}")
    config_digest = "sha256:" + hashlib.sha256(b"{}").hexdigest()
    sent: list[int] = []
    assert remote.push_blob(path, digest, advance=sent.append) is True
    assert sum(sent) == SIZE
    assert remote.push_blob(config, config_digest) is True
    assert remote.blob_size(digest) == SIZE

    manifest = manifest_for(digest, SIZE, config_digest)
    manifest_digest = remote.put_manifest("v1", manifest)
    assert remote.put_manifest("latest", manifest) == manifest_digest
    assert remote.manifest("v1") == (manifest, manifest_digest)
    assert remote.manifest(manifest_digest) == (manifest, manifest_digest)
    assert sorted(remote.tags()) == ["latest", "v1"]

    received: list[int] = []
    dest = tmp_path / "pulled"
    remote.pull_blob(digest, SIZE, dest, advance=received.append)
    assert dest.read_bytes() == path.read_bytes()
    assert sum(received) == SIZE
    assert not dest.with_name("pulled.part").exists()


def test_a_blob_already_there_is_not_sent_again(registry: RegistryServer,
                                                tmp_path: Path) -> None:
    remote = client(registry, tmp_path, "twice")
    path, digest = blob(tmp_path, 1 << 20)
    assert remote.push_blob(path, digest) is True
    sent: list[int] = []
    assert remote.push_blob(path, digest, advance=sent.append) is False
    assert sent == []


def test_a_blob_is_mounted_from_another_repository(registry: RegistryServer,
                                                   tmp_path: Path) -> None:
    source, target = client(registry, tmp_path, "mount-a"), client(registry, tmp_path, "mount-b")
    path, digest = blob(tmp_path, 2 << 20)
    source.push_blob(path, digest)
    assert target.blob_size(digest) is None
    sent: list[int] = []
    assert target.push_blob(path, digest, advance=sent.append, mount_from="mount-a") is False
    assert sent == []
    assert target.blob_size(digest) == 2 << 20


def test_missing_tag_and_missing_repository(registry: RegistryServer, tmp_path: Path) -> None:
    remote = client(registry, tmp_path, "nothing-here")
    assert remote.manifest("v1") is None
    assert remote.tags() == []
    assert remote.blob_size("sha256:" + "0" * 64) is None
    with pytest.raises(RegistryError, match="not a valid tag"):
        remote.manifest("../v1")


def test_a_pull_resumes_from_its_partial_file(registry: RegistryServer, tmp_path: Path) -> None:
    remote = client(registry, tmp_path, "resume")
    path, digest = blob(tmp_path)
    remote.push_blob(path, digest)
    dest = tmp_path / "entry"
    dest.with_name("entry.part").write_bytes(path.read_bytes()[:SIZE // 2])
    received: list[int] = []
    remote.pull_blob(digest, SIZE, dest, advance=received.append)
    assert sum(received) == SIZE - SIZE // 2
    assert dest.read_bytes() == path.read_bytes()
    assert not dest.with_name("entry.part").exists()


def test_a_damaged_blob_is_refused_and_nothing_is_left(registry: RegistryServer,
                                                       tmp_path: Path) -> None:
    remote = client(registry, tmp_path, "damaged")
    path, digest = blob(tmp_path, 3 << 20)
    remote.push_blob(path, digest)
    stored = registry.blob_file(digest)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.chmod(stat.S_IRUSR | stat.S_IWUSR)
    stored.write_bytes(bytes(data))
    damaged = "sha256:" + hashlib.sha256(data).hexdigest()
    dest = tmp_path / "entry"
    with pytest.raises(DigestMismatch) as raised:
        remote.pull_blob(digest, 3 << 20, dest)
    assert digest in str(raised.value) and damaged in str(raised.value)
    assert not dest.exists() and not dest.with_name("entry.part").exists()


def test_a_blob_larger_than_announced_is_refused(registry: RegistryServer,
                                                 tmp_path: Path) -> None:
    remote = client(registry, tmp_path, "larger")
    path, digest = blob(tmp_path, 2 << 20)
    remote.push_blob(path, digest)
    dest = tmp_path / "entry"
    with pytest.raises(DigestMismatch, match="more than 1048576 bytes"):
        remote.pull_blob(digest, 1 << 20, dest)
    assert not dest.exists() and not dest.with_name("entry.part").exists()


# -- credentials ---------------------------------------------------------------------------------

def test_a_wrong_password_names_the_file_and_docker_login(registry: RegistryServer,
                                                          tmp_path: Path) -> None:
    config = docker_config(tmp_path, registry.host, password="wrong")
    remote = Registry(registry.reference(), auth_file=config)
    with pytest.raises(RegistryAuthError) as raised:
        remote.ping()
    message = str(raised.value)
    assert "'ci'" in message and str(config) in message
    assert f"docker login {registry.host}" in message


def test_no_credentials_names_where_it_looked(registry: RegistryServer,
                                             no_docker_config: Path) -> None:
    remote = Registry(registry.reference())
    with pytest.raises(RegistryAuthError) as raised:
        remote.manifest("v1")
    message = str(raised.value)
    assert "none were found" in message and str(no_docker_config / ".docker") in message
    assert f"docker login {registry.host}" in message


def test_credentials_from_docker_config_in_either_key_form(
        registry: RegistryServer, no_docker_config: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    docker = no_docker_config / ".docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"auths": {
        f"https://{registry.host}": {"username": USER, "password": PASSWORD}}}))
    assert "user 'ci' accepted" in Registry(registry.reference()).ping()
    docker_config(tmp_path / "podman", registry.host)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "podman" / "config.json"))
    found = find_credentials(registry.host).credentials
    assert found is not None and found.source.startswith(str(tmp_path / "podman"))


def test_credentials_from_a_credential_helper(registry: RegistryServer, no_docker_config: Path,
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-test"
    asked = tmp_path / "asked"
    helper.write_text(f"#!/bin/sh\n[ \"$1\" = get ] || exit 2\ncat > {asked}\n"
                      f"echo '{{\"ServerURL\": \"x\", \"Username\": \"{USER}\", "
                      f"\"Secret\": \"{PASSWORD}\"}}'\n")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    docker = no_docker_config / ".docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"credHelpers": {registry.host: "test"}}))
    assert "docker-credential-test" in Registry(registry.reference()).ping()
    assert asked.read_text() == registry.host

    (docker / "config.json").write_text(json.dumps({"credHelpers": {registry.host: "absent"}}))
    with pytest.raises(RegistryAuthError, match="docker-credential-absent .* not on PATH"):
        Registry(registry.reference()).ping()


# -- failures ------------------------------------------------------------------------------------

def test_a_registry_that_is_down_is_reported_within_seconds(tmp_path: Path) -> None:
    port = free_port()
    remote = Registry(f"127.0.0.1:{port}/vm-cache", timeout=2)
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable) as raised:
        remote.manifest("v1")
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert f"127.0.0.1:{port} did not answer (connection refused" in message
    assert "SANDBOX_REGISTRY" in message


def test_tls_with_the_test_ca(tls_registry: RegistryServer, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert tls_registry.ca is not None
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_registry.ca))
    remote = client(tls_registry, tmp_path, "tls", insecure=False)
    assert "user 'ci' accepted" in remote.ping()
    path, digest = blob(tmp_path, 1 << 20)
    assert remote.push_blob(path, digest) is True
    remote.pull_blob(digest, 1 << 20, tmp_path / "pulled")
    assert (tmp_path / "pulled").read_bytes() == path.read_bytes()


def test_tls_without_the_ca_names_the_fix(tls_registry: RegistryServer, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    remote = client(tls_registry, tmp_path, "tls", insecure=False)
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable) as raised:
        remote.ping()
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert "TLS failed" in message and "REQUESTS_CA_BUNDLE" in message
    assert "SANDBOX_REGISTRY_INSECURE=1" in message


# -- Bearer tokens (the scheme ghcr.io uses) -----------------------------------------------------

def test_bearer_tokens_per_scope(token_registry: RegistryServer, tmp_path: Path) -> None:
    assert token_registry.tokens is not None
    asked = token_registry.tokens.asked
    remote = client(token_registry, tmp_path, "tokens")
    assert "user 'ci' accepted" in remote.ping()
    assert remote.manifest("v1") is None
    assert asked[-1] == (USER, ["repository:tokens:pull"])
    path, digest = blob(tmp_path, 1 << 20)
    assert remote.push_blob(path, digest) is True
    assert asked[-1] == (USER, ["repository:tokens:pull,push"]), "a pull token reused for push"
    count = len(asked)
    remote.pull_blob(digest, 1 << 20, tmp_path / "pulled")
    assert remote.tags() == []
    assert len(asked) == count, "tokens are kept per scope while they are valid"

    other = client(token_registry, tmp_path, "tokens-mounted")
    assert other.push_blob(path, digest, mount_from="tokens") is False
    assert asked[-1] == (USER, ["repository:tokens-mounted:pull,push",
                                "repository:tokens:pull"])
    assert other.blob_size(digest) == 1 << 20


def test_anonymous_tokens_pull_but_do_not_push(token_registry: RegistryServer,
                                               no_docker_config: Path, tmp_path: Path) -> None:
    pusher = client(token_registry, tmp_path, "public")
    path, digest = blob(tmp_path, 1 << 20)
    pusher.push_blob(path, digest)
    anonymous = Registry(token_registry.reference("public"))
    assert anonymous.ping().endswith("anonymous access accepted")
    anonymous.pull_blob(digest, 1 << 20, tmp_path / "pulled")
    assert (tmp_path / "pulled").read_bytes() == path.read_bytes()
    with pytest.raises(RegistryAuthError, match="none were found"):
        anonymous.push_blob(path, "sha256:" + hashlib.sha256(b"other").hexdigest())


def test_a_wrong_password_at_the_token_service(token_registry: RegistryServer,
                                               tmp_path: Path) -> None:
    config = docker_config(tmp_path, token_registry.host, password="wrong")
    with pytest.raises(RegistryAuthError, match="refused the credentials of user 'ci'"):
        Registry(token_registry.reference(), auth_file=config).manifest("v1")


def test_a_dropped_download_resumes_where_it_stopped(registry: RegistryServer,
                                                     tmp_path: Path) -> None:
    path, digest = blob(tmp_path)
    client(registry, tmp_path, "dropped").push_blob(path, digest)
    proxy = CuttingProxy(registry.port, cut_after=SIZE // 3)
    try:
        config = docker_config(tmp_path / "proxied", f"127.0.0.1:{proxy.port}")
        remote = Registry(f"127.0.0.1:{proxy.port}/dropped", auth_file=config)
        received: list[int] = []
        remote.pull_blob(digest, SIZE, tmp_path / "pulled", advance=received.append)
    finally:
        proxy.stop()
    assert (tmp_path / "pulled").read_bytes() == path.read_bytes()
    assert proxy.cut
    assert b"Range: bytes=" in proxy.sent
    assert sum(received) == SIZE, "resumed bytes are not counted twice"


def test_a_dropped_upload_starts_again(registry: RegistryServer, tmp_path: Path) -> None:
    path, digest = blob(tmp_path)
    proxy = CuttingProxy(registry.port, cut_after=SIZE // 3, cut_requests=True)
    try:
        config = docker_config(tmp_path / "proxied", f"127.0.0.1:{proxy.port}")
        remote = Registry(f"127.0.0.1:{proxy.port}/dropped-upload", auth_file=config)
        sent: list[int] = []
        assert remote.push_blob(path, digest, advance=sent.append) is True
    finally:
        proxy.stop()
    assert proxy.cut
    assert sum(sent) == SIZE, "bytes sent again are not counted twice"
    dest = tmp_path / "pulled"
    client(registry, tmp_path, "dropped-upload").pull_blob(digest, SIZE, dest)
    assert dest.read_bytes() == path.read_bytes()


def test_a_file_that_is_not_its_digest_is_refused_by_the_registry(
        registry: RegistryServer, tmp_path: Path) -> None:
    path, _ = blob(tmp_path, 1 << 20)
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DigestMismatch, match=f"should have digest {wrong}"):
        client(registry, tmp_path, "wrong-digest").push_blob(path, wrong)


def test_credentials_from_a_creds_store(registry: RegistryServer, no_docker_config: Path,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-store"
    helper.write_text(f"#!/bin/sh\nserver=$(cat)\nif [ \"$server\" = {registry.host} ]; then\n"
                      f"  echo '{{\"Username\": \"{USER}\", \"Secret\": \"{PASSWORD}\"}}'\n"
                      f"else\n  echo 'credentials not found in native keychain'; exit 1\nfi\n")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    docker = no_docker_config / ".docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"auths": {registry.host: {}},
                                                    "credsStore": "store"}))
    assert "docker-credential-store" in Registry(registry.reference()).ping()
    assert find_credentials("other.example").credentials is None


def test_an_identity_token_is_exchanged_for_registry_tokens(
        token_registry: RegistryServer, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {token_registry.host: {
        "auth": base64.b64encode(b"<token>:").decode(), "identitytoken": IDENTITY_TOKEN}}}))
    remote = Registry(token_registry.reference("identity"), auth_file=config)
    path, digest = blob(tmp_path, 1 << 20)
    assert remote.push_blob(path, digest) is True
    assert token_registry.tokens is not None
    assert token_registry.tokens.asked[-1] == (USER, ["repository:identity:pull,push"])


# -- what Debian's registry never does: 5xx, 429, pages of tags, lies -----------------------------

class ScriptedServer:
    """An HTTP server answering each path with the answers scripted for it, in turn (the
    last repeated), recording every request: for the behaviours a real registry cannot be
    made to show on demand."""

    def __init__(self, script: dict[str, list[tuple[int, dict[str, str], bytes]]]) -> None:
        self.script = script
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802  (the name http.server calls)
                server.answer(self)

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        self.requests.append((request.command, request.path))
        answers = self.script.get(request.path.split("?")[0], [(404, {}, b"")])
        status, headers, body = answers.pop(0) if len(answers) > 1 else answers[0]
        request.send_response(status)
        headers = {"Content-Length": str(len(body)), **headers}
        for name, value in headers.items():
            request.send_header(name, value)
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: dict[str, list[tuple[int, dict[str, str], bytes]]]) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_5xx_is_retried_a_bounded_number_of_times(scripted: Callable[..., ScriptedServer],
                                                  ) -> None:
    server = scripted({"/v2/": [(503, {}, b"")]})
    with pytest.raises(RegistryUnavailable, match="kept failing \\(it answered 503"):
        Registry(f"{server.host}/r", attempts=3).ping()
    assert len(server.requests) == 3


def test_429_is_retried_and_then_answered(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted({"/v2/": [(429, {}, b""), (200, {}, b"{}")]})
    assert Registry(f"{server.host}/r").ping() == f"{server.host} answers, no credentials needed"
    assert len(server.requests) == 2


def test_4xx_is_never_retried(scripted: Callable[..., ScriptedServer]) -> None:
    digest = "sha256:" + "1" * 64
    server = scripted({f"/v2/r/blobs/{digest}": [(403, {}, b"")],
                       "/v2/r/manifests/v1": [(400, {}, b'{"errors": [{"code": "BAD"}]}')]})
    remote = Registry(f"{server.host}/r")
    with pytest.raises(RegistryAuthError, match="denied blob"):
        remote.blob_size(digest)
    with pytest.raises(RegistryError, match="BAD"):
        remote.manifest("v1")
    assert len(server.requests) == 2


def test_tags_follow_their_pages(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted({"/v2/r/tags/list": [
        (200, {"Link": '</v2/r/tags/list?last=b&n=2>; rel="next"'},
         b'{"name": "r", "tags": ["a", "b"]}'),
        (200, {}, b'{"name": "r", "tags": ["c"]}')]})
    assert Registry(f"{server.host}/r").tags() == ["a", "b", "c"]
    assert server.requests[1] == ("GET", "/v2/r/tags/list?last=b&n=2")

    elsewhere = scripted({"/v2/r/tags/list": [
        (200, {"Link": '<http://example.com/v2/r/tags/list?last=b>; rel="next"'},
         b'{"tags": ["a"]}')]})
    with pytest.raises(RegistryError, match="another host"):
        Registry(f"{elsewhere.host}/r").tags()


def test_manifests_are_bounded_and_checked(scripted: Callable[..., ScriptedServer]) -> None:
    body = json.dumps({"schemaVersion": 2}).encode()
    lying = "sha256:" + hashlib.sha256(b"another manifest").hexdigest()
    server = scripted({
        "/v2/r/manifests/big": [(200, {}, b" " * ((4 << 20) + 1))],
        "/v2/r/manifests/lie": [(200, {"Docker-Content-Digest": lying}, body)]})
    remote = Registry(f"{server.host}/r")
    with pytest.raises(RegistryError, match="more than the 4194304"):
        remote.manifest("big")
    with pytest.raises(DigestMismatch, match=f"should have digest {lying}"):
        remote.manifest("lie")


def test_a_transfer_past_its_deadline_stops_and_keeps_what_it_has(
        registry: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    remote = client(registry, tmp_path, "deadline")
    path, digest = blob(tmp_path)
    monkeypatch.setattr(Registry, "_seconds", lambda self, size: 0.0)
    with pytest.raises(RegistryUnavailable, match="did not take blob .* within 0 s"):
        remote.push_blob(path, digest)
    monkeypatch.undo()
    remote.push_blob(path, digest)
    monkeypatch.setattr(Registry, "_seconds", lambda self, size: 0.0)
    dest = tmp_path / "entry"
    with pytest.raises(RegistryUnavailable, match="did not send blob .* for the next pull"):
        remote.pull_blob(digest, SIZE, dest)
    assert 0 < dest.with_name("entry.part").stat().st_size < SIZE
    monkeypatch.undo()
    remote.pull_blob(digest, SIZE, dest)
    assert dest.read_bytes() == path.read_bytes()


def test_a_missing_blob_is_not_found(registry: RegistryServer, tmp_path: Path) -> None:
    with pytest.raises(RegistryNotFound, match="has no blob"):
        client(registry, tmp_path, "empty").pull_blob("sha256:" + "2" * 64, 10,
                                                      tmp_path / "entry")
    assert not (tmp_path / "entry.part").exists()
