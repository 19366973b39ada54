"""The registry's error vocabulary: OCI error codes, their HTTP statuses, their JSON body.

Owns: `OCIError`, the one exception every parser in protocol/ raises on bad input, and
the table that gives each code its default message and status. A caller (the mirror)
catches `OCIError` and writes `status`, `headers` and `body()` as the response; nothing
else is needed to answer a bad request.

Never: does I/O, logs, or puts a credential in `detail` (the body goes to the client).

Which code for what (the spec's list is closed, "The code field MUST be one of the
following", so we stay inside it wherever a listed code fits):

- Spec codes keep the spec's message and distribution's status (MANIFEST_BLOB_UNKNOWN is
  400 as in distribution; UNSUPPORTED is 405 as in distribution).
- TAG_INVALID (400) is distribution's, named in the old spec schema; we send it for a
  tag that breaks the grammar, which clients read as a 400.
- RANGE_INVALID (416) is distribution's code for an unsatisfiable range; docker-registry
  itself sends it with 416, so clients that know registries know it.
- Malformed requests (a target too long, control bytes, `..` outside a name) are
  UNSUPPORTED with status 400: distribution describes UNSUPPORTED as "a missing
  implementation or invalid set of parameters", which is what they are.
- Unknown endpoints, and the referrers API we do not offer, are UNSUPPORTED with status
  404: the spec says a registry without the referrers API MUST answer 404, so clients
  fall back to the referrers tag schema. See `not_found`.
"""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, dataclass
from typing import Any

# code -> (default message, HTTP status)
ERROR_CODES: dict[str, tuple[str, int]] = {
    "BLOB_UNKNOWN": ("blob unknown to registry", 404),
    "BLOB_UPLOAD_INVALID": ("blob upload invalid", 400),
    "BLOB_UPLOAD_UNKNOWN": ("blob upload unknown to registry", 404),
    "DIGEST_INVALID": ("provided digest did not match uploaded content", 400),
    "MANIFEST_BLOB_UNKNOWN": ("manifest references a manifest or blob unknown to registry", 400),
    "MANIFEST_INVALID": ("manifest invalid", 400),
    "MANIFEST_UNKNOWN": ("manifest unknown to registry", 404),
    "NAME_INVALID": ("invalid repository name", 400),
    "NAME_UNKNOWN": ("repository name not known to registry", 404),
    "SIZE_INVALID": ("provided length did not match content length", 400),
    "UNAUTHORIZED": ("authentication required", 401),
    "DENIED": ("requested access to the resource is denied", 403),
    "UNSUPPORTED": ("the operation is unsupported", 405),
    "TOOMANYREQUESTS": ("too many requests", 429),
    "TAG_INVALID": ("invalid tag", 400),
    "RANGE_INVALID": ("requested range not satisfiable", 416),
}

READ_METHODS_ALLOW = "GET, HEAD"


@dataclass(frozen=True, eq=False)
class OCIError(Exception):
    """A request the registry refuses, as the client will see it.

    `headers` are extra response headers the status requires (`Allow` with a 405,
    `Content-Range` with a 416, `WWW-Authenticate` with a 401). Equality is identity,
    like any exception: `detail` may be an unhashable dict.
    """

    code: str
    message: str
    status: int
    detail: object | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        """The spec's JSON error body, compact and ASCII-only."""
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        entry["detail"] = self.detail
        return json.dumps({"errors": [entry]}, separators=(",", ":"), default=str).encode()

    def __str__(self) -> str:
        text = f"{self.status} {self.code}: {self.message}"
        return text if self.detail is None else f"{text} ({self.detail!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.message, self.status, self.detail, self.headers))


def _exception_setattr(self: OCIError, name: str, value: object) -> None:
    # The interpreter and libraries (contextlib.ExitStack, trio, add_note) assign
    # __context__, __cause__, __traceback__ and __notes__ from Python code; a plain
    # frozen dataclass would turn each of those into a FrozenInstanceError.
    if name.startswith("__") and name.endswith("__"):
        object.__setattr__(self, name, value)
        return
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


OCIError.__setattr__ = _exception_setattr  # type: ignore[method-assign,assignment]


def oci_error(
    code: str,
    detail: object | None = None,
    message: str | None = None,
    *,
    status: int | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> OCIError:
    """An `OCIError` with the code's default message and status unless given."""
    default_message, default_status = ERROR_CODES[code]
    return OCIError(
        code=code,
        message=default_message if message is None else message,
        status=default_status if status is None else status,
        detail=detail,
        headers=headers,
    )


def bad_request(detail: object | None = None, message: str = "malformed request") -> OCIError:
    """400 for a request no endpoint could parse (see the module docstring)."""
    return oci_error("UNSUPPORTED", detail, message, status=400)


def not_found(detail: object | None = None, message: str = "unknown endpoint") -> OCIError:
    """404 for an endpoint this registry does not have (see the module docstring)."""
    return oci_error("UNSUPPORTED", detail, message, status=404)


def method_not_allowed(method: str, allow: str = READ_METHODS_ALLOW) -> OCIError:
    """405 UNSUPPORTED with the `Allow` header RFC 9110 requires; this mirror only reads."""
    return oci_error(
        "UNSUPPORTED",
        {"method": method, "allow": allow},
        "this registry mirror is read-only" if allow else "the operation is unsupported",
        headers=(("Allow", allow),),
    )
