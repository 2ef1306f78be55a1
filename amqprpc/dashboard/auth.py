"""Who may see the dashboard and change things: secure by default.

- **Bind**: 127.0.0.1 unless ``--host`` says otherwise; any other address needs
  ``--auth user:password`` (HTTP Basic) or ``--token TOKEN`` (:func:`bind_refusal` says why
  not, and the command exits 2 with that one line).
- **Requests**: with ``--token``, every request carries ``Authorization: Bearer TOKEN`` or
  the cookie the page sets after it was opened once with ``?token=TOKEN`` (the token itself
  is then redirected out of the address bar, and the cookie holds an HMAC of it, never the
  token); with ``--auth``, HTTP Basic. Anything else is 401. Comparisons are constant-time.
- **Loopback without credentials**: requests must name a loopback host in ``Host``, so a
  web page on the internet cannot reach the dashboard through DNS rebinding.
- **CSRF**: every mutating request (POST) carries ``X-CSRF-Token``, an HMAC of the
  browser's session cookie under a per-process secret; the page gets it embedded, a script
  from ``GET /api/csrf`` (with the session cookie it sets). A foreign origin is refused too.
- **No credentials in pages or logs**: the page never shows the token or the password,
  URLs are shown with their passwords redacted, and the access log omits query strings.

The secret is made at start: restarting the dashboard invalidates its cookies (the page
asks for ``?token=`` again) and CSRF tokens (the page reloads).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
from typing import Mapping

SESSION_COOKIE = "amqprpc_dashboard_session"
AUTH_COOKIE = "amqprpc_dashboard_auth"
CSRF_HEADER = "x-csrf-token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name, as given to --host) is this machine only."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, user_password: str | None, token: str | None) -> str | None:
    """Why the dashboard must not start with these options (None when it may)."""
    if user_password is not None and token is not None:
        return "give --auth or --token, not both"
    if user_password is not None and (":" not in user_password or not user_password.split(":", 1)[0]
                                      or not user_password.split(":", 1)[1]):
        return "--auth must be USER:PASSWORD (both non-empty)"
    if token is not None and len(token) < 16:
        return ("--token must be at least 16 characters "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
    if not is_loopback(host) and user_password is None and token is None:
        return (f"refusing to serve the dashboard on {host} without authentication: "
                f"add --auth USER:PASSWORD or --token TOKEN (or bind 127.0.0.1)")
    return None


class Auth:
    """The dashboard's access rules (see the module docstring). ``mode`` is ``none``,
    ``basic`` or ``token``."""

    def __init__(self, user_password: str | None = None, token: str | None = None, *,
                 secret: bytes | None = None, loopback_only: bool = True):
        self._secret = secret or os.urandom(32)
        user, _, password = (user_password or "").partition(":")
        self._user: str | None = user if user_password else None
        self._password: str | None = password if user_password else None
        self._token = token
        self.mode = "token" if token else "basic" if user_password else "none"
        self.loopback_only = loopback_only

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    # --- who is asking -------------------------------------------------------------
    def identify(self, headers: Mapping[str, str], cookies: Mapping[str, str], client: str) -> str | None:
        """Who makes this request (for the audit log), or None when it is not allowed."""
        if self.mode == "none":
            return f"local@{client}"
        authorization = headers.get("authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if self.mode == "token":
            if scheme.lower() == "bearer" and self.token_matches(credentials.strip()):
                return f"token@{client}"
            if hmac.compare_digest(cookies.get(AUTH_COOKIE, ""), self.auth_cookie()):
                return f"token-cookie@{client}"
            return None
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        assert self._user is not None and self._password is not None
        if hmac.compare_digest(user.encode(), self._user.encode()) & \
                hmac.compare_digest(password.encode(), self._password.encode()):
            return f"{user}@{client}"
        return None

    def token_matches(self, given: str) -> bool:
        return self._token is not None and hmac.compare_digest(given.encode(), self._token.encode())

    def auth_cookie(self) -> str:
        """What the token cookie holds: an HMAC of the token, worthless outside this process."""
        return self._mac("auth", self._token or "")

    def challenge(self) -> dict[str, str]:
        """Headers of a 401."""
        return {"WWW-Authenticate": 'Basic realm="amqprpc dashboard"'} if self.mode == "basic" else \
            {"WWW-Authenticate": 'Bearer realm="amqprpc dashboard"'}

    def host_allowed(self, host_header: str) -> bool:
        """Without credentials, only a loopback Host (no DNS rebinding); with them, any."""
        if self.mode != "none" or not self.loopback_only:
            return True
        host = host_header.strip().lower()
        if host.startswith("["):
            name = host[1:].partition("]")[0]
        else:
            name = host.rpartition(":")[0] if host.count(":") == 1 else host
        return is_loopback(name)

    # --- CSRF ----------------------------------------------------------------------
    def new_session(self) -> str:
        return base64.urlsafe_b64encode(os.urandom(18)).decode()

    def csrf_token(self, session: str) -> str:
        return self._mac("csrf", session)

    def csrf_valid(self, session: str | None, token: str | None) -> bool:
        return bool(session) and bool(token) and hmac.compare_digest(self.csrf_token(session or ""), token or "")
