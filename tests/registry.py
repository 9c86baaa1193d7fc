"""A real OCI registry for the tests: Debian's docker-registry (unpacked into
``.tools/docker-registry`` by install.sh, never installed as a service) on 127.0.0.1 with a
free port, a config of its own, storage in a temporary directory, optionally htpasswd users
(bcrypt entries) and TLS with a CA made here. It dies with the test run.

tests/conftest.py exposes the session fixtures ``registry`` (htpasswd, plain HTTP),
``tls_registry`` (htpasswd, TLS) and ``token_registry`` (Bearer tokens from a
:class:`TokenServer`, the scheme ghcr.io uses); :func:`docker_config` writes a config.json
for them."""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import bcrypt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from sandbox.base.processes import spawn

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / ".tools" / "docker-registry" / "usr" / "bin" / "docker-registry"
USER, PASSWORD = "ci", "secret-ci-password"
IDENTITY_TOKEN = "identity-token-of-ci"
START_SECONDS = 15.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for IP 127.0.0.1 signed by it, in ``directory``:
    (CA certificate, server certificate, server key)."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandbox test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem_key(key))
    return paths


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A token service for a registry's Bearer auth, in a thread of the test process: RS256
    tokens carrying their signing certificate (``x5c``), granting user ``USER`` pull and
    push and anyone anonymous pull only, for exactly the scopes asked. ``asked`` records
    each request as (user or None, scopes)."""

    ISSUER, SERVICE = "sandbox-test-issuer", "sandbox-tests"

    def __init__(self, directory: Path, users: dict[str, str]) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandbox test tokens")])
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=2))
                     .sign(self.key, hashes.SHA256()))
        self.bundle = directory / "token-signer.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.users = users
        self.asked: list[tuple[str | None, list[str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802  (the name http.server calls)
                server.answer(self)

            def do_POST(self) -> None:  # noqa: N802
                server.answer(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def token(self, user: str | None, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            repository, _, actions = rest.rpartition(":")
            allowed = {"pull", "push"} if user else {"pull"}
            access.append({"type": kind, "name": repository,
                           "actions": sorted(set(actions.split(",")) & allowed)})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(
            self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": self.ISSUER, "sub": user or "", "aud": self.SERVICE,
                  "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": secrets.token_hex(8), "access": access}
        signed = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signed}.{_b64url(signature)}"

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(request.path).query)
        user: str | None = None
        given = request.headers.get("Authorization", "")
        if given.startswith("Basic "):
            name, _, password = base64.b64decode(given[6:]).decode().partition(":")
            if self.users.get(name) != password:
                request.send_response(401)
                request.end_headers()
                return
            user = name
        scopes = query.get("scope", [])
        if request.command == "POST":  # an identity token exchanged for a registry token
            length = min(int(request.headers.get("Content-Length", "0")), 1 << 16)
            form = parse_qs(request.rfile.read(length).decode())
            if form.get("refresh_token") != [IDENTITY_TOKEN]:
                request.send_response(401)
                request.end_headers()
                return
            user, scopes = USER, " ".join(form.get("scope", [])).split()
        self.asked.append((user, scopes))
        body = json.dumps({"token": self.token(user, scopes), "expires_in": 300}).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class CuttingProxy:
    """A TCP proxy in front of a registry that drops the first connection through which more
    than ``cut_after`` bytes of answers went (a dropped download), or of requests with
    ``cut_requests`` (a dropped upload); after that cut every connection passes whole.
    ``sent`` holds what clients sent, to see the Range a resumed download asked for."""

    def __init__(self, target_port: int, cut_after: int, *, cut_requests: bool = False) -> None:
        self.target_port, self.cut_after = target_port, cut_after
        self.cut_requests = cut_requests
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.connections = 0
        self.cut = False
        self.sent = bytearray()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False, True),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True, False),
                             daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, answers: bool,
              record: bool) -> None:
        passed = 0
        try:
            while data := source.recv(1 << 16):
                if record:
                    self.sent += data
                if (answers != self.cut_requests and not self.cut
                        and passed + len(data) > self.cut_after):
                    self.cut = True
                    sink.sendall(data[:self.cut_after - passed])
                    break
                sink.sendall(data)
                passed += len(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def stop(self) -> None:
        self.listener.close()


class RegistryServer:
    """One docker-registry process on 127.0.0.1, started by :meth:`start`, stopped by
    :meth:`stop` (by the pid it started)."""

    def __init__(self, directory: Path, *, users: dict[str, str] | None = None,
                 tls: bool = False, tokens: TokenServer | None = None) -> None:
        self.directory = directory
        self.storage = directory / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.users = users
        self.ca: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "registry.log"
        lines = ["version: 0.1", "log:", "  level: warn", "  accesslog:",
                 "    disabled: true", "storage:", "  filesystem:",
                 f"    rootdirectory: {self.storage}", "  delete:", "    enabled: true",
                 "http:", f"  addr: {self.host}", f"  secret: {secrets.token_hex(16)}"]
        if tls:
            self.ca, cert, key = make_tls(directory)
            lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
        if users:
            htpasswd = directory / "htpasswd"
            htpasswd.write_text("".join(
                f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(5)).decode()}\n"
                for user, password in users.items()))
            lines += ["auth:", "  htpasswd:", "    realm: sandbox-tests",
                      f"    path: {htpasswd}"]
        if tokens is not None:
            lines += ["auth:", "  token:", f"    realm: {tokens.realm}",
                      f"    service: {tokens.SERVICE}", f"    issuer: {tokens.ISSUER}",
                      f"    rootcertbundle: {tokens.bundle}"]
        self.tokens = tokens
        self.config = directory / "config.yml"
        self.config.write_text("\n".join(lines) + "\n")
        self.url = f"{'https' if tls else 'http'}://{self.host}"

    def reference(self, repository: str = "vm-cache") -> str:
        return f"{self.host}/{repository}"

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps blob ``digest`` (to damage it on purpose)."""
        hex_digest = digest.removeprefix("sha256:")
        return (self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
                / hex_digest[:2] / hex_digest / "data")

    def start(self) -> RegistryServer:
        if not SERVER.exists():
            pytest.fail(f"{SERVER} is missing: run ./install.sh", pytrace=False)
        self.storage.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.process = spawn([str(SERVER), "serve", str(self.config)],
                                 die_with_parent=True, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited with status "
                                   f"{self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                requests.get(f"{self.url}/v2/", timeout=1, verify=str(self.ca or True))
                return self
            except requests.RequestException:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer on {self.host} within "
                           f"{START_SECONDS:.0f} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def docker_config(directory: Path, host: str, user: str = USER, password: str = PASSWORD,
                  ) -> Path:
    """A docker ``config.json`` in ``directory`` holding ``user:password`` for ``host`` (as
    base64 ``auth``, the way ``docker login`` writes it); its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A registry with htpasswd user ``USER`` (password ``PASSWORD``), plain HTTP."""
    server = RegistryServer(tmp_path_factory.mktemp("registry"), users={USER: PASSWORD})
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A registry with htpasswd user ``USER``, over TLS with a test CA (``.ca``)."""
    server = RegistryServer(tmp_path_factory.mktemp("tls-registry"), users={USER: PASSWORD},
                            tls=True)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A registry with Bearer tokens from a :class:`TokenServer` (``.tokens``), plain HTTP:
    user ``USER`` may push, anonymous clients may pull."""
    directory = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(directory, {USER: PASSWORD})
    server = RegistryServer(directory, tokens=tokens)
    try:
        yield server.start()
    finally:
        server.stop()
        tokens.stop()
