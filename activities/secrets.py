"""Resolve `SecretRef`s to values - the only place in zerodown where that happens.

Secrets never travel through workflow inputs or history: workflows pass the reference,
activities call `resolve_secret` right before use. Values are never logged nor put into
error messages (only the reference is named).

And in case one slips into a text anyway (a command line that carries a password, a tool's
error that echoes it, a config value the inventory marks secret): every value resolved here,
or registered with `register_secret`, is masked by `redact` - in ssh's heartbeats and
errors, and by the worker's redaction interceptor and log record factory (worker/redaction.py) in
every activity result, heartbeat, error and log line the worker process produces.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, TypeVar

from activities.common import fail
from errors import SECRET_UNAVAILABLE
from inventory.model import SecretRef

T = TypeVar("T")

MASK = "***"
# Shorter values are not masked: replacing every "ab" in every text would garble them, and
# a secret that short protects nothing anyway.
MIN_MASKED_LEN = 4

_known: set[str] = set()
_by_length: tuple[str, ...] = ()
_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Mask `value` from now on, in this process (a resolved secret, a secret config value)."""
    global _by_length
    value = value.strip()
    if len(value) < MIN_MASKED_LEN or value in _known:
        return
    with _lock:
        _known.add(value)
        # Longest first: a secret that contains another is masked whole.
        _by_length = tuple(sorted(_known, key=len, reverse=True))


def redact(text: str) -> str:
    """`text` with every registered secret replaced by ***."""
    for value in _by_length:
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact_value(value: T) -> T:
    """A copy of `value` with every string in it redacted: str, bytes (UTF-8), tuples,
    lists, dicts and (frozen) dataclasses, recursively; the value itself when nothing in it
    changes. Used on activity results and heartbeat details."""
    if not _by_length:
        return value
    return _redact_any(value)  # type: ignore[no-any-return]


def _redact_any(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return value
        masked = redact(text)
        return value if masked == text else masked.encode("utf-8")
    if isinstance(value, tuple | list):
        items = [_redact_any(v) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        pairs = [(_redact_any(k), _redact_any(v)) for k, v in value.items()]
        if all(k2 is k and v2 is v for (k2, v2), (k, v) in zip(pairs, value.items(), strict=True)):
            return value
        return type(value)(pairs)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for f in dataclasses.fields(value):
            if not f.init:
                continue
            old = getattr(value, f.name)
            new = _redact_any(old)
            if new is not old:
                changes[f.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    return value


def resolve_secret(ref: SecretRef, needed_by: str = "") -> str:
    """Return the secret's value; raise SecretUnavailable (non-retryable) when it cannot.

    `needed_by` names the consumer (e.g. "ssh node1") so the operator knows what to fix.
    One trailing newline of a secret file is removed (files written by `echo` have one).
    """
    why = f" (needed by {needed_by})" if needed_by else ""
    if ref.env:
        value = os.environ.get(ref.env)
        if not value:
            fail(SECRET_UNAVAILABLE, f"environment variable {ref.env} is not set{why}")
        register_secret(value)
        return value
    if ref.file:
        try:
            with open(ref.file, encoding="utf-8") as f:
                value = f.read()
        except FileNotFoundError:
            fail(SECRET_UNAVAILABLE, f"secret file {ref.file} does not exist{why}")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            fail(SECRET_UNAVAILABLE, f"secret file {ref.file} is not readable: {reason}{why}")
        if value.endswith("\r\n"):
            value = value[:-2]
        elif value.endswith("\n"):
            value = value[:-1]
        if not value:
            fail(SECRET_UNAVAILABLE, f"secret file {ref.file} is empty{why}")
        register_secret(value)
        return value
    fail(SECRET_UNAVAILABLE, f"secret reference names neither env nor file{why}")
