"""Secrets are masked in whatever the worker writes (issue 17.5): activities/secrets.py's
registry and worker/redaction.py's interceptor and log record factory.

On a real dev server, an activity that lets a resolved secret slip into its heartbeat, its
error (and the error's cause), its result and a log line leaves none of it in the history
or the log with the worker's interceptors; without them the same run leaves it in the
history, which is what the check (tests/secret_leaks.py) is there to catch."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
    from activities.secrets import MASK, redact, redact_value, register_secret, resolve_secret
    from inventory.model import SecretRef
    from lab.config import SECRET_MARKER, new_secret
    from tests import secret_leaks
    from worker.main import RESUME_OPTIONS
    from worker.redaction import install_log_redaction, redacted_error

SECRET_ENV = "ZD_TEST_REDACTION_SECRET"


@dataclass(frozen=True)
class Leaked:
    command: str
    lines: tuple[str, ...]


def test_redact_masks_every_registered_value_longest_first() -> None:
    short, long = new_secret(8), ""
    long = short + "-and-more"
    register_secret(short)
    register_secret(long)
    register_secret("abc")  # too short to mask: it would garble every text
    assert redact(f"a={long} b={short} c=abc") == f"a={MASK} b={MASK} c=abc"
    value = Leaked(command=f"tool -P {short}", lines=("ok", long))
    masked = redact_value(value)
    assert masked == Leaked(command=f"tool -P {MASK}", lines=("ok", MASK))
    clean = Leaked(command="tool", lines=("ok",))
    assert redact_value(clean) is clean  # nothing to mask: the same object
    assert redact_value({"k": [short.encode()]}) == {"k": [MASK.encode()]}


def test_a_masked_error_keeps_its_type_retry_flag_and_cause() -> None:
    secret = new_secret()
    register_secret(secret)
    try:
        try:
            raise RuntimeError(f"stderr: bad password {secret}")
        except RuntimeError as cause:
            raise ApplicationError(f"tool -P {secret} failed", {"arg": secret}, type="ToolFailed") from cause
    except ApplicationError as e:
        masked = redacted_error(e)
    assert isinstance(masked, ApplicationError)
    assert masked.message == f"tool -P {MASK} failed" and masked.type == "ToolFailed"
    assert not masked.non_retryable and masked.details == ({"arg": MASK},)
    assert isinstance(masked.__cause__, ApplicationError)
    assert masked.__cause__.type == "RuntimeError" and secret not in str(masked.__cause__)
    assert redacted_error(ApplicationError("nothing secret here")) is None


def test_log_records_are_masked_whatever_the_handler(caplog: pytest.LogCaptureFixture) -> None:
    install_log_redaction()
    secret = new_secret()
    register_secret(secret)
    with caplog.at_level(logging.INFO):
        logging.getLogger("zerodown.test").info("connecting with %s", secret)
        try:
            raise ValueError(secret)
        except ValueError:
            logging.getLogger("zerodown.test").exception("failed")
    assert secret not in caplog.text and MASK in caplog.text


def test_a_record_made_where_the_secrets_module_cannot_be_imported_is_still_masked(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inside the workflow sandbox (the SDK's warning about a failed workflow task) importing
    # activities.secrets fails: its threading.Lock is restricted. The factory must not import.
    install_log_redaction()
    secret = new_secret()
    register_secret(secret)
    import sys

    monkeypatch.setitem(sys.modules, "activities.secrets", None)  # any import of it raises
    with caplog.at_level(logging.WARNING):
        logging.getLogger("temporalio.workflow").warning("workflow task failed near %s", secret)
    assert secret not in caplog.text and f"workflow task failed near {MASK}" in caplog.text


@activity.defn
async def heartbeats_then_hangs() -> None:
    secret = resolve_secret(SecretRef(env=SECRET_ENV))
    activity.heartbeat({"command": f"runupdate -A oxadminmaster -P {secret}"})
    activity.logger.info("running runupdate -P %s", secret)
    await asyncio.sleep(2.5)  # past start-to-close: the timeout records the last heartbeat


@activity.defn
async def fails_with_it() -> None:
    secret = resolve_secret(SecretRef(env=SECRET_ENV))
    try:
        raise RuntimeError(f"stderr: Authentication failed for {secret}")
    except RuntimeError as e:
        raise ApplicationError(
            f"command 'tool -P {secret}' exited with status 1", type="ToolFailed", non_retryable=True
        ) from e


@activity.defn
async def returns_it() -> Leaked:
    secret = resolve_secret(SecretRef(env=SECRET_ENV))
    return Leaked(command=f"tool -P {secret}", lines=(secret,))


@workflow.defn(name="secret-leak-probe")
class SecretLeakProbe:
    @workflow.run
    async def run(self) -> list[str]:
        seen: list[str] = []
        once = RetryPolicy(maximum_attempts=1)
        for act, timeout in ((heartbeats_then_hangs, 1.5), (fails_with_it, 30.0)):
            try:
                await workflow.execute_activity(
                    act, start_to_close_timeout=timedelta(seconds=timeout), retry_policy=once
                )
            except ActivityError as e:
                cause = e.cause
                if isinstance(cause, ApplicationError):
                    seen.append(f"{cause.type} non_retryable={cause.non_retryable}")
                else:
                    seen.append(type(cause).__name__)
        leaked: Leaked = await workflow.execute_activity(
            returns_it, start_to_close_timeout=timedelta(seconds=30), retry_policy=once
        )
        seen.append(leaked.command)
        return seen


async def _run(client: Client, options: dict[str, object]) -> tuple[list[str], list[str], list[str]]:
    task_queue = f"redaction-{uuid.uuid4().hex[:8]}"
    with secret_leaks.captured_logs() as logs:
        async with Worker(
            client,
            task_queue=task_queue,
            workflows=[SecretLeakProbe],
            activities=[heartbeats_then_hangs, fails_with_it, returns_it],
            **options,  # type: ignore[arg-type]
        ):
            seen = await client.execute_workflow(
                SecretLeakProbe.run, id=f"secret-leak-{uuid.uuid4().hex[:8]}", task_queue=task_queue
            )
            found, _ = await secret_leaks.leaks(client, task_queue, [], (SECRET_MARKER,))
    return seen, found, [ln for ln in logs if SECRET_MARKER in ln]


async def test_the_worker_writes_no_secret_into_the_history_nor_the_log(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_log_redaction()
    monkeypatch.setenv(SECRET_ENV, new_secret())
    seen, found, logged = await _run(client, dict(RESUME_OPTIONS))
    assert found == [] and logged == []
    # The errors are what the activity raised: the type and the retry flag, masked text.
    assert seen == ["TimeoutError", "ToolFailed non_retryable=True", f"tool -P {MASK}"]


async def test_without_the_interceptor_the_check_finds_the_secret(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, new_secret())
    seen, found, _ = await _run(client, {})
    # In the heartbeat the timeout recorded, the error, its cause and the result.
    assert len(found) >= 1 and any("history" in f for f in found)
    assert seen[-1].startswith(f"tool -P {SECRET_MARKER}")
