"""Who may use the knobs page: the checks every request to `robot/ui/server.py` passes first.

Loopback is no trust boundary: every local process and every web page the operator's browser opens can
send requests to the page's port. So:

- **Host allow-list** (every request): the Host header's name must be one the page is served as (loopback
  names, the bind address, `allowed_hosts`). A DNS-rebinding page (`Host: evil.example`) is refused.
- **A per-launch secret**: printed once, in the URL the command shows (`/?token=...`); opening it sets an
  HttpOnly, SameSite=Strict cookie and redirects to `/` (the secret leaves the address bar). Every other
  request needs the cookie. A page from another site never gets it sent, and no script can read it.
- **Origin** (every POST): must be the page's own origin (`http://` + the request's Host). Cookies are not
  port-scoped, so a page on another port of the same host is "same-site" and would send the cookie; its
  Origin gives it away. A POST without Origin (no browser sends one) is refused too.
- **JSON only, strict Content-Length** (every POST): `Content-Type: application/json`, so a form or a
  `text/plain` fetch (no CORS preflight) is refused; Content-Length must be plain digits within the limit
  and is the only body framing accepted (no chunked bodies), so nothing is read past the limit.

A refusal is a `Refused` with the HTTP status and a message the page shows.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlsplit

COOKIE = "vla_steer_knobs"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SESSION_HELP = "open the URL `vla-steer knobs ui` printed when it started (it carries this launch's secret)"


@dataclass(frozen=True)
class Refused(Exception):
    status: HTTPStatus
    message: str

    def __str__(self) -> str:
        return self.message


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def host_name(host_header: str) -> str:
    """'127.0.0.1:8765' -> '127.0.0.1'; '[::1]:8765' -> '::1'; lower case."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class Guard:
    """The checks, for one launch (one secret) of the page served at `bind`."""

    def __init__(
        self, secret: str, bind: str, allowed_hosts: tuple[str, ...] = (), max_body: int = 64 * 1024
    ):
        self.secret = secret
        self.hosts = frozenset(h.lower() for h in (*LOOPBACK_NAMES, bind, *allowed_hosts))
        self.max_body = max_body

    def host(self, headers) -> str:
        values = headers.get_all("Host") or []
        if len(values) != 1 or host_name(values[0]) not in self.hosts:
            raise Refused(
                HTTPStatus.MISDIRECTED_REQUEST,
                f"this page is served as {sorted(self.hosts)}, not as {values!r} (a DNS-rebinding page?); "
                "more names: vla-steer knobs ui --allow-host NAME",
            )
        return values[0].strip()

    def token_in_url(self, path: str) -> bool:
        """Whether `path` carries this launch's secret (`/?token=...`)."""
        given = parse_qs(urlsplit(path).query).get("token", [""])[0]
        return bool(given) and hmac.compare_digest(given.encode(), self.secret.encode())

    def session(self, headers) -> None:
        """The cookie set from the URL's secret must come with the request."""
        jar = SimpleCookie()
        try:
            for raw in headers.get_all("Cookie") or []:
                jar.load(raw)
        except CookieError:
            jar = SimpleCookie()
        given = jar[COOKIE].value if COOKIE in jar else ""
        if not (given and hmac.compare_digest(given.encode(), self.secret.encode())):
            raise Refused(
                HTTPStatus.FORBIDDEN, f"no valid session for this launch of the knobs page: {SESSION_HELP}"
            )

    def cookie(self) -> str:
        return f"{COOKIE}={self.secret}; HttpOnly; SameSite=Strict; Path=/"

    def origin(self, headers, host: str) -> None:
        origin = headers.get("Origin")
        if origin != f"http://{host}":
            raise Refused(
                HTTPStatus.FORBIDDEN,
                f"refused a request from origin {origin!r}: only the page served at http://{host} may change "
                "knobs, stop or resume",
            )

    def body_length(self, headers) -> int:
        """The JSON body's length, after the content type and framing checks."""
        ctype = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise Refused(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"the body must be Content-Type: application/json, got {headers.get('Content-Type')!r}",
            )
        if headers.get("Transfer-Encoding") is not None:
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "no Transfer-Encoding: send a Content-Length")
        values = headers.get_all("Content-Length") or []
        if len(values) != 1:
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "exactly one Content-Length header is required")
        raw = values[0].strip()
        if not (raw.isascii() and raw.isdigit()):
            raise Refused(
                HTTPStatus.BAD_REQUEST, f"Content-Length must be a non-negative integer, got {raw!r}"
            )
        n = int(raw)
        if n > self.max_body:
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over {self.max_body} bytes")
        return n
