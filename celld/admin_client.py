"""The client side of the admin API: what `celld stage`, `pins`, `ls`... send.

Owns the HTTP/1.1 conversation with the daemon over its unix socket
(`<data_dir>/admin.sock`, the contract in notes/admin-api.md) and turns every
way it can fail into an AdminError with one line for the user: no socket, a
refused connection, an error status, a connection dropped mid-answer, an
answer that is not the contract's JSON. Never prints and never exits (cli.py
does); never raises an httpx exception to its caller.

A registry password passes through `stage` only: it goes into the request
body, and every reference this module holds to it is dropped once the body
is sent. It is never logged, never part of an error message, never written.
(Python cannot wipe a str in place; dropping references is what it allows.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

BASE_URL = "http://celld"
CONNECT_TIMEOUT = 5.0
# Listing and gc answer in well under this; staging streams for as long as
# the transfers take, with gaps of a whole blob's push between events.
READ_TIMEOUT = 300.0


class AdminError(Exception):
    """Something the user must be told, in one line, with exit status 1."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class DaemonNotRunning(AdminError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"the daemon is not running (no socket at {path})")
        self.path = path


@dataclass
class Credentials:
    """A registry login for one staging. Not frozen and not repr'd: `forget()`
    drops the password, and a stray print shows no secret."""

    username: str
    password: str | None

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"

    def forget(self) -> None:
        self.password = None


def _os_error(exc: BaseException) -> OSError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _once(data: bytes) -> Iterator[bytes]:
    yield data


def _error_message(response: httpx.Response) -> str:
    try:
        doc = response.json()
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return doc["error"]
    except ValueError:
        pass
    return f"the daemon answered {response.status_code} {response.reason_phrase}"


class AdminClient:
    """One connection's worth of admin requests; use it as a context manager."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url=BASE_URL,
            timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- the endpoints -----------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/v1/status")

    def pins(self) -> dict[str, Any]:
        return self._call("GET", "/v1/pins")

    def unpin(self, app: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/pins/{quote(app, safe='')}")

    def ls(self) -> dict[str, Any]:
        return self._call("GET", "/v1/ls")

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/v1/stats")

    def peers(self) -> dict[str, Any]:
        return self._call("GET", "/v1/peers")

    def gc(self, keep_seconds: float | None = None) -> dict[str, Any]:
        body = None if keep_seconds is None else {"keep_seconds": keep_seconds}
        return self._call("POST", "/v1/gc", body)

    def stage(
        self,
        image: str,
        app: str,
        credentials: Credentials | None = None,
        platform: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Start a staging; yield its events as they arrive, the last one
        "done" or "error". `credentials` is forgotten once the body is sent."""
        body = {
            "image": image,
            "app": app,
            "username": credentials.username if credentials else None,
            "password": credentials.password if credentials else None,
            "platform": platform,
        }
        content = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(content))}
        # A one-shot iterator, not bytes: once sent, the request object that
        # the response keeps no longer holds the body (and its password).
        stream = _once(content)
        del body, content
        if credentials is not None:
            credentials.forget()
        try:
            response = self._http.send(
                self._http.build_request("POST", "/v1/stage", content=stream, headers=headers),
                stream=True,
            )
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        finally:
            stream.close()
        try:
            if response.status_code != 200:
                response.read()
                raise AdminError(_error_message(response), response.status_code)
            last: dict[str, Any] | None = None
            for line in response.iter_lines():
                if not line.strip():
                    continue
                last = self._event(line)
                yield last
                if last.get("event") in ("done", "error"):
                    return
        except httpx.HTTPError as exc:
            raise AdminError(
                "the daemon closed the connection before staging finished (see the daemon's log)"
            ) from exc
        finally:
            response.close()
        raise AdminError("the daemon's answer ended before staging finished (see the daemon's log)")

    # -- plumbing ----------------------------------------------------------

    def _call(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if not 200 <= response.status_code < 300:
            raise AdminError(_error_message(response), response.status_code)
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise AdminError(f"the daemon's answer to {method} {path} is not a JSON object")
        return doc

    @staticmethod
    def _event(line: str) -> dict[str, Any]:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            raise AdminError("the daemon sent a staging event that is not a JSON object")
        return event

    def _transport_error(self, exc: httpx.HTTPError) -> AdminError:
        cause = _os_error(exc)
        if isinstance(exc, httpx.ConnectError) and isinstance(
            cause, FileNotFoundError | ConnectionRefusedError
        ):
            return DaemonNotRunning(self.socket_path)
        if isinstance(cause, PermissionError):
            return AdminError(
                f"cannot reach the daemon at {self.socket_path}: permission denied"
                " (run as the daemon's user)"
            )
        if isinstance(exc, httpx.TimeoutException):
            return AdminError(f"the daemon did not answer in time (socket {self.socket_path})")
        if isinstance(exc, httpx.ConnectError):
            reason = cause.strerror if cause is not None and cause.strerror else "cannot connect"
            return AdminError(f"cannot reach the daemon at {self.socket_path}: {reason}")
        return AdminError("the daemon closed the connection before answering (see its log)")
