"""Resolve `SecretRef`s to values - the only place in zerodown where that happens.

Secrets never travel through workflow inputs or history: workflows pass the reference,
activities call `resolve_secret` right before use. Values are never logged nor put into
error messages (only the reference is named).
"""

from __future__ import annotations

import os

from activities.common import fail
from errors import SECRET_UNAVAILABLE
from inventory.model import SecretRef


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
        return value
    fail(SECRET_UNAVAILABLE, f"secret reference names neither env nor file{why}")
