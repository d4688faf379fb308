"""BIG-IP's authentication tokens (restjavad's /mgmt/shared/authz/tokens): issue, look up,
extend, delete; the per-user limit. In memory: a restart of the stand-in forgets every
token, as a restart of restjavad does not (tokens live in its storage), which the lab can
afford - a client logs in again after its 401.

The numbers and texts are in lab/f5/facts.py with their sources.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lab.f5 import facts

# An expired token is kept this long to answer "has expired" rather than "does not exist";
# it no longer counts towards the user's limit.
_KEEP_EXPIRED_S = 3600.0


class TokenError(Exception):
    """A refused token operation: HTTP status and BIG-IP's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Token:
    token: str
    username: str
    address: str
    start: float  # seconds since the epoch
    timeout_s: int
    generation: int = 1
    last_update: float = field(default=0.0)

    @property
    def expires(self) -> float:
        # "absolute timeout": the lifetime counts from the token's start, a PATCH of
        # `timeout` moves the end, not the start (DevCentral token management article).
        return self.start + self.timeout_s

    def expired(self, now: float) -> bool:
        return now >= self.expires

    def body(self) -> dict[str, Any]:
        """The token item (facts.TOKEN_KIND's sources)."""
        return {
            "token": self.token,
            "name": self.token,
            "userName": self.username,
            "authProviderName": facts.LOGIN_PROVIDER,
            "user": {"link": f"https://localhost/mgmt/shared/authz/users/{self.username}"},
            "groupReferences": [],
            "timeout": self.timeout_s,
            "startTime": facts.start_time_text(self.start),
            "address": self.address,
            "partition": "[All]",
            "generation": self.generation,
            "lastUpdateMicros": facts.micros(self.last_update),
            # BIG-IP's expirationMicros is whole milliseconds (the captures end in 000).
            "expirationMicros": facts.micros(self.expires) // 1000 * 1000,
            "kind": facts.TOKEN_KIND,
            "selfLink": facts.token_self_link(self.token),
        }


def _new_token_text() -> str:
    # 26 upper-case base32 characters, like "FZ42XIKJMI6UGXDD7I3VU52EUY" (automation labs).
    return base64.b32encode(secrets.token_bytes(20)).decode()[:26]


class TokenStore:
    def __init__(self, default_timeout_s: int, clock: Callable[[], float] = time.time) -> None:
        self.default_timeout_s = default_timeout_s
        self._clock = clock
        self._tokens: dict[str, Token] = {}

    def _prune(self, now: float) -> None:
        for key in [k for k, t in self._tokens.items() if now - t.expires > _KEEP_EXPIRED_S]:
            del self._tokens[key]

    def active_count(self, username: str) -> int:
        now = self._clock()
        return sum(1 for t in self._tokens.values() if t.username == username and not t.expired(now))

    def issue(self, username: str, address: str) -> Token:
        now = self._clock()
        self._prune(now)
        if (
            username != facts.TOKEN_LIMIT_EXEMPT_USER
            and self.active_count(username) >= facts.MAX_TOKENS_PER_USER
        ):
            raise TokenError(400, facts.token_limit_message(username))
        token = Token(
            token=_new_token_text(),
            username=username,
            address=address,
            start=now,
            timeout_s=self.default_timeout_s,
            last_update=now,
        )
        self._tokens[token.token] = token
        return token

    def check(self, text: str) -> Token:
        """The live token `text` (X-F5-Auth-Token), or TokenError 401."""
        token = self._tokens.get(text)
        if token is None:
            raise TokenError(401, facts.TOKEN_UNKNOWN_MESSAGE)
        if token.expired(self._clock()):
            raise TokenError(401, facts.TOKEN_EXPIRED_MESSAGE)
        return token

    def get(self, text: str) -> Token | None:
        token = self._tokens.get(text)
        return None if token is None or token.expired(self._clock()) else token

    def set_timeout(self, token: Token, timeout_s: int) -> Token:
        if timeout_s > facts.MAX_TOKEN_TIMEOUT_S:
            raise TokenError(facts.TIMEOUT_EXCEEDED_STATUS, facts.TIMEOUT_EXCEEDED_MESSAGE)
        token.timeout_s = timeout_s
        token.generation += 1
        token.last_update = self._clock()
        return token

    def delete(self, token: Token) -> None:
        self._tokens.pop(token.token, None)
