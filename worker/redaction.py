"""No secret leaves the worker process: a worker interceptor and a log record factory.

Activities resolve secrets themselves (activities/secrets.py registers every value it
resolves) and keep them out of what they return. This is the net under that rule: whatever an
activity hands back to the server - its result, each heartbeat's details, the message,
details and causes of the error it raises - has every registered secret masked (***) before
it is written into the workflow's history; and every log record of the process is masked
before a handler formats it. A text with nothing to mask passes unchanged (the same object),
so retries, error types and non-retryable flags are exactly what the activity raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ActivityOutboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

# activities.secrets is imported where it is used, not here: a workflow's sandbox re-imports
# modules that import worker.main, and importing the activities package there (asyncssh,
# cryptography) is refused.


def redacted_error(error: BaseException) -> BaseException | None:
    """`error` rebuilt with its message, details and causes masked; None when nothing in it
    needs masking (then the original is raised as it is)."""
    from activities.secrets import redact, redact_value

    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and len(chain) < 20:
        chain.append(e)
        e = e.__cause__
    texts = [_message(x) for x in chain]
    details = [tuple(x.details) if isinstance(x, ApplicationError) else () for x in chain]
    if all(redact(t) == t for t in texts) and all(redact_value(d) is d for d in details):
        return None
    rebuilt: BaseException | None = None
    for x, text, det in reversed(list(zip(chain, texts, details, strict=True))):
        new = ApplicationError(
            redact(text),
            *redact_value(det),
            type=x.type if isinstance(x, ApplicationError) else type(x).__name__,
            # A plain exception is retried, as the SDK would have converted it.
            non_retryable=x.non_retryable if isinstance(x, ApplicationError) else False,
            next_retry_delay=x.next_retry_delay if isinstance(x, ApplicationError) else None,
        )
        new.__cause__ = rebuilt
        rebuilt = new
    return rebuilt


def _message(e: BaseException) -> str:
    return e.message if isinstance(e, ApplicationError) else str(e)


class _Outbound(ActivityOutboundInterceptor):
    def heartbeat(self, *details: Any) -> None:
        from activities.secrets import redact_value

        super().heartbeat(*redact_value(details))


class _Inbound(ActivityInboundInterceptor):
    def init(self, outbound: ActivityOutboundInterceptor) -> None:
        super().init(_Outbound(outbound))

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            result = await super().execute_activity(input)
        except Exception as e:  # cancellation (a BaseException) passes untouched
            masked = redacted_error(e)
            if masked is None:
                raise
            raise masked from None
        from activities.secrets import redact_value

        return redact_value(result)


class RedactionInterceptor(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Inbound(next)


def _redact_record(record: logging.LogRecord, redact: Callable[[str], str]) -> None:
    message = record.getMessage()
    masked = redact(message)
    if masked != message:
        record.msg, record.args = masked, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)


_installed = False


def install_log_redaction() -> None:
    """Mask registered secrets in every log record this process creates, whichever logger
    and handler (the record factory, so a handler added later is covered too). Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    make = logging.getLogRecordFactory()
    # Bound now, outside any workflow: a record made inside the workflow sandbox (the SDK's
    # warning about a failed workflow task) must not import the module there, where its
    # threading.Lock is restricted (the warning about that would recurse into this factory).
    from activities.secrets import redact

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        _redact_record(record, redact)
        return record

    logging.setLogRecordFactory(factory)
