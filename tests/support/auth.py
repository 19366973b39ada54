"""Registries that ask for credentials, for tests of celld's registry client.

Owns three test parts, all on loopback and all real where it matters:

- `TokenServer`: the token service of distribution's `auth: token` scheme. It
  answers `GET /token?service=&scope=` with a JWT signed by a fresh EC key
  whose self-signed certificate the registry trusts (`rootcertbundle`), sent
  in the token's `x5c` header: docker-registry 2.8 verifies that chain against
  its bundle, then the ES256 signature, `iss`, `aud`, `exp`/`nbf` and the
  `access` claim. Anonymous callers get `pull` on public repositories only;
  a configured user with the right password gets what was asked for; a wrong
  password gets 401. It records every request it got (who, which scopes,
  what it granted), never the password, so tests can assert the flow.
- `htpasswd_registry`: docker-registry with `auth: htpasswd` (HTTP Basic),
  its file hashed with bcrypt by the system's libcrypt (no extra package).
- `StorageServer`: the storage a registry redirects blob GETs to (the
  `redirect` storage middleware, as registries do with S3 or a CDN); it
  records the headers it received, so a test can show that no credential
  followed the redirect.

Signing shells out to the `openssl` CLI (Debian: `openssl`, a dependency of
`ca-certificates`), so the tests need no Python crypto package.
"""

from __future__ import annotations

import base64
import ctypes
import hmac
import json
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.support.images import Image, Index, push_image
from tests.support.registry import Registry

SERVICE = "celld-test-registry"
ISSUER = "celld-test-issuer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _der_ecdsa_to_raw(der: bytes, size: int = 32) -> bytes:
    """openssl writes ECDSA signatures as DER SEQUENCE{r, s}; JWS wants r || s."""
    if der[0] != 0x30:
        raise ValueError("not a DER sequence")
    pos = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = b""
    for _ in range(2):
        if der[pos] != 0x02:
            raise ValueError("not a DER integer")
        length = der[pos + 1]
        value = der[pos + 2 : pos + 2 + length]
        out += value.lstrip(b"\0").rjust(size, b"\0")
        pos += 2 + length
    return out


@dataclass(frozen=True)
class SigningKey:
    """An EC P-256 key and its self-signed certificate, made with openssl."""

    key_path: Path
    cert_path: Path

    @classmethod
    def create(cls, directory: Path) -> SigningKey:
        directory.mkdir(parents=True, exist_ok=True)
        key, cert = directory / "token.key", directory / "token.crt"
        subprocess.run(
            [
                *(
                    "openssl",
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ),
                *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2"),
                *("-subj", "/CN=celld-test-token-issuer"),
            ],
            check=True,
            capture_output=True,
        )
        return cls(key, cert)

    @property
    def cert_der_b64(self) -> str:
        pem = self.cert_path.read_text().splitlines()
        return "".join(line for line in pem if line and not line.startswith("-----"))

    def sign(self, data: bytes) -> bytes:
        der = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key_path)],
            input=data,
            check=True,
            capture_output=True,
        ).stdout
        return _der_ecdsa_to_raw(der)

    def jwt(self, claims: dict) -> str:
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self.cert_der_b64]}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        return signing_input + "." + _b64url(self.sign(signing_input.encode()))


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server got. `user` is None for an anonymous one."""

    user: str | None
    password_ok: bool | None
    service: str
    scopes: tuple[str, ...]
    status: int
    granted: tuple[tuple[str, tuple[str, ...]], ...]  # (repository, actions)


@dataclass
class TokenServer:
    """A token service for docker-registry's `auth: token`, in a thread."""

    key: SigningKey
    users: dict[str, str]
    public_prefix: str = "public/"
    expires_in: int = 60
    token_fields: tuple[str, ...] = ("token", "access_token")
    requests: list[TokenRequest] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)  # tokens, so tests can look for leaks
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self._server is not None, "token server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def registry_auth(self) -> dict:
        """The `auth:` section of a docker-registry config that trusts this server."""
        return {
            "token": {
                "realm": self.realm,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(self.key.cert_path),
            }
        }

    def mint(self, access: list[tuple[str, tuple[str, ...]]], subject: str = "") -> str:
        now = int(time.time())
        return self.key.jwt(
            {
                "iss": ISSUER,
                "sub": subject,
                "aud": SERVICE,
                "exp": now + self.expires_in,
                "nbf": now - 10,
                "iat": now,
                "jti": secrets.token_hex(8),
                "access": [
                    {"type": "repository", "name": name, "actions": list(actions)}
                    for name, actions in access
                ],
            }
        )

    def count(self, **match: object) -> int:
        """How many recorded requests have all the given field values."""
        with self._lock:
            return sum(all(getattr(r, k) == v for k, v in match.items()) for r in self.requests)

    def _grant(self, user: str | None, scopes: tuple[str, ...]) -> list:
        granted = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) != 3 or parts[0] != "repository":
                continue
            _, name, actions = parts
            wanted = [a for a in actions.split(",") if a in ("pull", "push")]
            if user is None:
                wanted = [a for a in wanted if a == "pull" and name.startswith(self.public_prefix)]
            if wanted:
                granted.append((name, tuple(wanted)))
        return granted

    def _handle(self, handler: BaseHTTPRequestHandler) -> tuple[int, dict]:
        url = urlsplit(handler.path)
        query = parse_qs(url.query)
        service = query.get("service", [""])[0]
        scopes = tuple(s for value in query.get("scope", []) for s in value.split(" ") if s)
        user, password_ok = None, None
        header = handler.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                user, password = "?", ""
            expected = self.users.get(user)
            password_ok = expected is not None and hmac.compare_digest(
                expected.encode(), password.encode()
            )
            del password
        status, body, granted = 200, {}, []
        if url.path != "/token":
            status, body = 404, {"details": "not found"}
        elif service != SERVICE:
            status, body = 400, {"details": "unknown service"}
        elif password_ok is False:
            status, body = 401, {"details": "incorrect username or password"}
        else:
            granted = self._grant(user, scopes)
            token = self.mint(granted, subject=user or "")
            self.issued.append(token)
            body = {name: token for name in self.token_fields}
            body["expires_in"] = self.expires_in
            body["issued_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._lock:
            self.requests.append(
                TokenRequest(user, password_ok, service, scopes, status, tuple(granted))
            )
        return status, body

    def start(self) -> TokenServer:
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = server_self._handle(self)
                data = json.dumps(body).encode()
                self.send_response(status)
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="celld-test-tokens"')
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class RecordingHandler(BaseHTTPRequestHandler):
    """Serves files under `server.root`; records (method, path, headers)."""

    server: StorageServer

    def _serve(self, send_body: bool) -> None:
        self.server.record(self.command, self.path, dict(self.headers.items()))
        target = (self.server.root / self.path.split("?")[0].lstrip("/")).resolve()
        if not target.is_relative_to(self.server.root) or not target.is_file():
            self.send_error(404)
            return
        data = target.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve(True)

    def do_HEAD(self) -> None:
        self._serve(False)

    def log_message(self, format: str, *args: object) -> None:
        pass


class StorageServer(ThreadingHTTPServer):
    """The blob storage a registry redirects to (think S3), on its own port."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        self.root = root.resolve()
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def record(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.seen.append((method, path, headers))

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@dataclass
class RedirectingRegistry(Registry):
    """A docker-registry whose blob GETs answer 307 to `storage_url`."""

    storage_url: str = ""

    def _config(self) -> str:
        return super()._config() + (
            "middleware:\n"
            "  storage:\n"
            "    - name: redirect\n"
            "      options:\n"
            f"        baseurl: {self.storage_url}/\n"
        )


def bcrypt_hash(password: str, cost: int = 5) -> str:
    """bcrypt via libcrypt (libxcrypt, Essential on Debian); cost 5 keeps tests fast."""
    alphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    salt = "".join(secrets.choice(alphabet) for _ in range(21)) + "."
    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    out = lib.crypt(password.encode(), f"$2b${cost:02d}${salt}".encode())
    if not out or not out.startswith(b"$2b$"):
        raise RuntimeError("libcrypt has no bcrypt")
    return out.decode()


@dataclass
class AuthHub:
    """A registry that asks for credentials, plus what tests need to use it."""

    registry: Registry
    users: dict[str, str]
    tokens: TokenServer | None = None
    storage: StorageServer | None = None

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def host(self) -> str:
        return self.registry.host

    def _pusher_auth(self, name: str) -> httpx.Auth:
        if self.tokens is None:
            user, password = next(iter(self.users.items()))
            return httpx.BasicAuth(user, password)
        token = self.tokens.mint([(name, ("pull", "push"))], subject="test-seeder")

        class Bearer(httpx.Auth):
            def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
                request.headers["Authorization"] = f"Bearer {token}"
                yield request

        return Bearer()

    def push(self, name: str, tag: str, image: Image | Index) -> None:
        """Seeds an image with the tests' own pusher (a minted token, not the token endpoint)."""
        push_image(self.url, name, tag, image, auth=self._pusher_auth(name))

    def stop(self) -> None:
        self.registry.stop()
        for part in (self.tokens, self.storage):
            if part is not None:
                part.stop()


def token_registry(root: Path, users: dict[str, str], **token_opts: object) -> AuthHub:
    """docker-registry with `auth: token`, its token server and blob storage behind a redirect."""
    tokens = TokenServer(SigningKey.create(root / "keys"), users, **token_opts).start()
    storage = StorageServer(root / "registry" / "data")
    registry = RedirectingRegistry(
        root / "registry", auth=tokens.registry_auth(), storage_url=storage.url
    )
    return AuthHub(registry.start(), users, tokens, storage)


def htpasswd_registry(root: Path, users: dict[str, str]) -> AuthHub:
    """docker-registry with `auth: htpasswd` (HTTP Basic, bcrypt)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "htpasswd"
    path.write_text("".join(f"{u}:{bcrypt_hash(p)}\n" for u, p in users.items()))
    registry = Registry(
        root / "registry", auth={"htpasswd": {"realm": "celld-test-basic", "path": str(path)}}
    )
    return AuthHub(registry.start(), users)


@pytest.fixture
def token_hub(tmp_path: Path) -> Iterator[AuthHub]:
    """A Hub with token auth: `alice` may pull and push anything, anyone may pull public/*."""
    hub = token_registry(tmp_path / "token-hub", {"alice": "alice-" + secrets.token_hex(8)})
    yield hub
    hub.stop()


@pytest.fixture
def htpasswd_hub(tmp_path: Path) -> Iterator[AuthHub]:
    """A registry with HTTP Basic auth for user `bob`."""
    hub = htpasswd_registry(tmp_path / "htpasswd-hub", {"bob": "bob-" + secrets.token_hex(8)})
    yield hub
    hub.stop()
