"""Signing a gate decision with the approver's SSH key, on the approver's machine.

`zerodown approve / reject / resolve` build the decision message (workflows/signatures.py:
workflow id, gate, the gate's occurrence, choice, plan hash) and sign it with OpenSSH's own
`ssh-keygen -Y sign -n zerodown`, the tool README tells operators to use by hand for the
`temporal workflow update` and Web UI paths: the same bytes, the same signature format. The
key is a private key file, or a public key file whose private half ssh-agent holds
(ssh-keygen's rule); a key with a passphrase asks for it on the terminal, as ssh does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from workflows.signatures import NAMESPACE, decision_message

KEY_ENV = "ZERODOWN_APPROVAL_KEY"


class SigningFailed(RuntimeError):
    """ssh-keygen could not sign (no such key, wrong passphrase, agent without the key)."""


def env_key() -> Path | None:
    """$ZERODOWN_APPROVAL_KEY as a path, or None."""
    key = os.environ.get(KEY_ENV, "")
    return Path(key).expanduser() if key else None


def approval_key(given: str | None) -> Path:
    """The key to sign with: --key, else $ZERODOWN_APPROVAL_KEY; SigningFailed when neither."""
    path = Path(given).expanduser() if given else env_key()
    if path is None:
        raise SigningFailed(
            f"decisions are signed: give --key (your private key, or the .pub of a key in ssh-agent) "
            f"or set {KEY_ENV}"
        )
    if not path.exists():
        raise SigningFailed(f"signing key {path} does not exist")
    return path


def sign(message: bytes, key: Path) -> str:
    """The armored SSHSIG signature of `message` by `key` (namespace zerodown)."""
    tool = shutil.which("ssh-keygen")
    if tool is None:
        raise SigningFailed("ssh-keygen is not installed (Debian package openssh-client)")
    proc = subprocess.run(
        [tool, "-Y", "sign", "-n", NAMESPACE, "-f", str(key), "-q"],
        input=message,
        capture_output=True,
        timeout=120,
        check=False,
    )
    text = proc.stdout.decode("utf-8", errors="replace")
    if proc.returncode != 0 or "BEGIN SSH SIGNATURE" not in text:
        why = proc.stderr.decode("utf-8", errors="replace").strip() or f"exit status {proc.returncode}"
        raise SigningFailed(f"ssh-keygen -Y sign with {key}: {why}")
    return text.strip()


def sign_decision(
    key: Path, workflow_id: str, gate: str, occurrence: int, choice: str, plan_hash: str
) -> str:
    return sign(decision_message(workflow_id, gate, occurrence, choice, plan_hash), key)
