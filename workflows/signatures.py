"""Gate decisions signed with the approver's SSH key (issue 17.6): the message and its check.

A decision is bound to a person by a signature, not by the name typed into `by`. The signer
signs the *decision message* below with `ssh-keygen -Y sign -n zerodown` (OpenSSH's SSHSIG
format, from a key file or ssh-agent); the gate's validator verifies it against the keys
the inventory lists for that approver (`approver_keys`). The message names everything the
decision means, so a signature cannot be reused for another one:

    zerodown-decision-v1\\n
    workflow: <workflow id>\\n
    gate: <gate name>\\n
    occurrence: <how many times this gate has opened in the run, 1 first>\\n
    choice: <approve | reject | the chosen option of a choice gate>\\n
    plan: <plan hash, 64 hex digits>\\n

(UTF-8, each line ending in one LF, nothing after the last.) Another workflow, an earlier
opening of the same gate (a failure gate can open twice), another choice or another plan
each give other bytes, and the signature does not verify.

SSHSIG (OpenSSH PROTOCOL.sshsig): the armored blob holds "SSHSIG", version 1, the public
key, the namespace, a reserved string, the hash algorithm (sha256 or sha512) and the
signature; what is signed is "SSHSIG" || namespace || reserved || hash algorithm ||
H(message), each but the first as an SSH string. Pure computation, no I/O: it runs inside
the workflow (an update's validator, the `decide` signal's handler) and replays the same.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Sequence

from temporalio import workflow

from inventory.keys import PublicKeyError, fingerprint, key_blob

with workflow.unsafe.imports_passed_through():
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

NAMESPACE = "zerodown"
MESSAGE_VERSION = "zerodown-decision-v1"
_ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_ARMOR_END = "-----END SSH SIGNATURE-----"
_HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
_ECDSA_HASH: dict[str, hashes.HashAlgorithm] = {
    "nistp256": hashes.SHA256(),
    "nistp384": hashes.SHA384(),
    "nistp521": hashes.SHA512(),
}


class SignatureRefused(ValueError):
    """The signature does not bind this decision; the message says why."""


def decision_message(workflow_id: str, gate: str, occurrence: int, choice: str, plan_hash: str) -> bytes:
    """The exact bytes a decider signs (module docstring)."""
    lines = (
        MESSAGE_VERSION,
        f"workflow: {workflow_id}",
        f"gate: {gate}",
        f"occurrence: {occurrence}",
        f"choice: {choice}",
        f"plan: {plan_hash}",
    )
    return "".join(line + "\n" for line in lines).encode("utf-8")


def _string(data: bytes, at: int) -> tuple[bytes, int]:
    if at + 4 > len(data):
        raise SignatureRefused("the signature is truncated")
    (n,) = struct.unpack(">I", data[at : at + 4])
    end = at + 4 + n
    if end > len(data):
        raise SignatureRefused("the signature is truncated")
    return data[at + 4 : end], end


def _ssh_string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _unarmor(armored: str) -> bytes:
    text = armored.strip()
    if not (text.startswith(_ARMOR_BEGIN) and text.endswith(_ARMOR_END)):
        raise SignatureRefused(f"not an SSH signature (expected {_ARMOR_BEGIN} ... {_ARMOR_END})")
    body = "".join(text[len(_ARMOR_BEGIN) : -len(_ARMOR_END)].split())
    try:
        return base64.b64decode(body, validate=True)
    except ValueError:
        raise SignatureRefused("the signature's armor does not hold base64") from None


def verify(armored: str, message: bytes, public_keys: Sequence[str]) -> str:
    """The fingerprint of the key in `public_keys` that signed `message` (namespace
    zerodown); SignatureRefused when none did."""
    blob = _unarmor(armored)
    if blob[:6] != b"SSHSIG":
        raise SignatureRefused("not an SSHSIG signature")
    (version,) = struct.unpack(">I", blob[6:10]) if len(blob) >= 10 else (0,)
    if version != 1:
        raise SignatureRefused(f"SSHSIG version {version} (expected 1)")
    signer, at = _string(blob, 10)
    namespace, at = _string(blob, at)
    reserved, at = _string(blob, at)
    hash_name, at = _string(blob, at)
    signature, at = _string(blob, at)
    if namespace != NAMESPACE.encode():
        shown = namespace.decode(errors="replace")
        raise SignatureRefused(f"signed for namespace {shown!r}, not {NAMESPACE!r}")
    hash_fn = _HASHES.get(hash_name.decode(errors="replace"))
    if hash_fn is None:
        raise SignatureRefused(f"hash algorithm {hash_name.decode(errors='replace')!r} (sha256 or sha512)")
    try:
        listed = {key_blob(k): k for k in public_keys}
    except PublicKeyError as e:
        raise SignatureRefused(f"a listed key is unusable: {e}") from None
    if signer not in listed:
        raise SignatureRefused(f"signed with key {fingerprint(signer)}, which is not listed")
    signed = (
        b"SSHSIG"
        + _ssh_string(namespace)
        + _ssh_string(reserved)
        + _ssh_string(hash_name)
        + _ssh_string(hash_fn(message).digest())
    )
    sig_alg, after = _string(signature, 0)
    raw, _ = _string(signature, after)
    if not _verified(listed[signer], sig_alg.decode(errors="replace"), raw, signed):
        raise SignatureRefused(f"the signature by key {fingerprint(signer)} is not one of this decision")
    return fingerprint(signer)


def _verified(public_key: str, sig_alg: str, raw: bytes, signed: bytes) -> bool:
    key = load_ssh_public_key(public_key.encode("ascii"))
    try:
        if isinstance(key, ed25519.Ed25519PublicKey) and sig_alg == "ssh-ed25519":
            key.verify(raw, signed)
        elif isinstance(key, rsa.RSAPublicKey) and sig_alg in ("rsa-sha2-512", "rsa-sha2-256"):
            digest: hashes.HashAlgorithm = hashes.SHA512() if sig_alg == "rsa-sha2-512" else hashes.SHA256()
            key.verify(raw, signed, padding.PKCS1v15(), digest)
        elif isinstance(key, ec.EllipticCurvePublicKey) and sig_alg.startswith("ecdsa-sha2-"):
            curve = sig_alg.removeprefix("ecdsa-sha2-")
            r, at = _string(raw, 0)
            s, _ = _string(raw, at)
            der = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
            key.verify(der, signed, ec.ECDSA(_ECDSA_HASH[curve]))
        else:
            return False  # e.g. ssh-rsa (SHA-1), which SSHSIG does not allow
    except (InvalidSignature, KeyError):
        return False
    return True
