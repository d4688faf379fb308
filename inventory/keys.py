"""OpenSSH public key lines (`ssh-ed25519 AAAA... comment`): their wire blob and fingerprint.

Pure parsing, no cryptography: the inventory loader checks `approver_keys` with it, and
workflows/signatures.py finds the listed key a signature names by its blob.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct

# The key types SSHSIG signatures are verified for (workflows/signatures.py).
KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
)


class PublicKeyError(ValueError):
    """Not a usable OpenSSH public key line; the message says why."""


def key_blob(line: str) -> bytes:
    """The wire blob (base64-decoded second field) of a public key line."""
    parts = line.split()
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise PublicKeyError(
            f"expected an OpenSSH public key line ({', '.join(KEY_TYPES)}), "
            f"e.g. the content of ~/.ssh/id_ed25519.pub; got {line[:40]!r}"
        )
    try:
        blob = base64.b64decode(parts[1], validate=True)
        (n,) = struct.unpack(">I", blob[:4])
        kind = blob[4 : 4 + n].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        raise PublicKeyError(f"{parts[0]} key: its base64 part is not a public key") from None
    if kind != parts[0]:
        raise PublicKeyError(f"{parts[0]} key: its base64 part is a {kind} key")
    return blob


def fingerprint(blob: bytes) -> str:
    """As `ssh-keygen -l` shows it: SHA256:<base64, no padding>."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
