"""Who may read the dashboard, and the headers every answer carries.

The dashboard shows the fleet to whoever can reach its port, so by default it listens
on loopback only. A non-loopback address is refused unless a token is set; then every
request must carry it, as `Authorization: Bearer TOKEN` or as the cookie that a one-time
`?token=TOKEN` link sets (for a person with a browser). The cookie holds an HMAC of the
token, not the token, and every comparison is constant-time. A wrong or missing token
gets 401 and the answer never repeats what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "fleetledger_dashboard"
MIN_TOKEN_CHARS = 16  # a guessable token on an open port is no protection

# No inline script or style anywhere: the CSP forbids both, so an escaped-by-mistake
# string still could not run. Pages are never framed (clickjacking).
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
     b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) only accepts local connections."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def check_exposure(host: str, token: str | None) -> None:
    """ValueError unless serving on `host` is allowed: loopback, or any with a token."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the dashboard token must be at least {MIN_TOKEN_CHARS} characters "
                         "(e.g. `openssl rand -hex 16`)")
    if not is_loopback(host) and token is None:
        raise ValueError(f"the dashboard would be reachable from other machines on {host}; "
                         "give it a token (--web-token-file FILE) or listen on 127.0.0.1")


def cookie_value(token: str) -> str:
    """What the session cookie holds: a keyed hash of the token (domain-separated), so a
    cookie read off a disk is not the token itself."""
    return hmac.new(token.encode(), b"fleetledger dashboard cookie v1",
                    hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class TokenGate:
    """ASGI middleware: the token check (when a token is set) and the security headers
    (always)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token
        self.cookie = cookie_value(token) if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        if self.token is None or scope.get("path") == "/healthz":
            await self.app(scope, receive, send_with_headers)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and _same(auth[7:].strip(), self.token):
            await self.app(scope, receive, send_with_headers)
            return
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(headers.get("cookie", ""))
        except Exception:  # a malformed cookie header is no credential
            jar = SimpleCookie()
        assert self.cookie is not None
        if COOKIE in jar and _same(jar[COOKIE].value, self.cookie):
            await self.app(scope, receive, send_with_headers)
            return
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                          keep_blank_values=True)
        given = [v for k, v in query if k == "token"]
        if given and _same(given[-1], self.token):
            # Set the cookie and send the browser to the same page without the token, so
            # it stays out of the address bar, the history and any Referer.
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            location = str(scope.get("path", "/")) + (f"?{rest}" if rest else "")
            await send_with_headers({"type": "http.response.start", "status": 303, "headers": [
                (b"location", location.encode("latin-1", "replace")),
                (b"set-cookie", f"{COOKIE}={self.cookie}; Path=/; HttpOnly; "
                                f"SameSite=Strict".encode()),
                (b"content-length", b"0")]})
            await send_with_headers({"type": "http.response.body", "body": b""})
            return
        body = (b"401: this dashboard needs its token: send `Authorization: Bearer TOKEN`, "
                b"or open the link with ?token=TOKEN once (the hub's operator has it)\n")
        await send_with_headers({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"www-authenticate", b'Bearer realm="fleetledger"'),
            (b"content-length", str(len(body)).encode())]})
        await send_with_headers({"type": "http.response.body", "body": body})
