"""Who may use the console: the operator token (``--auth-token-env``) as a bearer header or exchanged at the login form
for a signed session cookie, and the CSRF token every form carries.

Without a token the console is read-only: no form is rendered and every POST is refused. With one, every page asks for
it. Signatures use a key drawn at start-up, so restarting the console signs everyone out; the token itself is never
stored in a cookie or written into a page.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

__all__ = ["SESSION_COOKIE", "Auth", "Viewer"]

SESSION_COOKIE = "gatefill_session"
#: The login form's double-submit cookie (the form posts before any session exists).
LOGIN_COOKIE = "gatefill_login"
#: How long a session cookie is honoured.
SESSION_SECONDS = 12 * 3600


@dataclass(frozen=True)
class Viewer:
    """The request's operator: signed in (by header or cookie) or not, and the CSRF token of the session."""

    identity: str | None
    csrf: str | None
    auth_required: bool

    @property
    def signed_in(self) -> bool:
        return self.identity is not None

    @property
    def can_write(self) -> bool:
        """Forms are rendered and POSTs accepted only for a signed-in operator of a console that has a token."""
        return self.auth_required and self.identity is not None


class Auth:
    """Checks the operator token, signs and verifies session cookies, and derives each session's CSRF token."""

    def __init__(self, token: str | None) -> None:
        self._token = token
        self._key = secrets.token_bytes(32)

    @property
    def required(self) -> bool:
        return self._token is not None

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def token_matches(self, offered: str | None) -> bool:
        if self._token is None or not offered:
            return False
        return hmac.compare_digest(offered.encode(), self._token.encode())

    def bearer_matches(self, header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    def new_session(self, now: float | None = None) -> str:
        """A cookie value: a random session id, its expiry and their signature."""
        expires = int((now or time.time()) + SESSION_SECONDS)
        body = f"{secrets.token_urlsafe(16)}.{expires}"
        return f"{body}.{self._sign(body)}"

    def session_id(self, cookie: str | None, now: float | None = None) -> str | None:
        """The session id of a cookie whose signature holds and which has not expired; None otherwise."""
        parts = (cookie or "").split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        body = f"{parts[0]}.{parts[1]}"
        if not hmac.compare_digest(self._sign(body), parts[2]) or int(parts[1]) < (now or time.time()):
            return None
        return parts[0]

    def csrf_for(self, identity: str) -> str:
        return self._sign("csrf:" + identity)

    def csrf_matches(self, identity: str, offered: str | None) -> bool:
        return bool(offered) and hmac.compare_digest(self.csrf_for(identity), offered or "")

    def viewer(self, authorization: str | None, cookie: str | None) -> Viewer:
        """The operator a request comes from: a bearer token (identity ``bearer``) or a valid session cookie."""
        if not self.required:
            return Viewer(None, None, False)
        identity = "bearer" if self.bearer_matches(authorization) else self.session_id(cookie)
        if identity is None:
            return Viewer(None, None, True)
        return Viewer(identity, self.csrf_for(identity), True)
