"""HTTP checks against a node (directly, bypassing the load balancer) or the public URL.

check_health: one request, status must match. wait_healthy: poll until N consecutive
successes (a node that answers once right after start may still be warming up).
get_version: JSON {"version": ...} or plain text. check_login: POST {user, password} with
the password resolved from its SecretRef here, never echoed in messages. check_serving:
health, version and login of one server in one activity (a maintenance window's test).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from temporalio import activity

from activities.common import fail, heartbeat, previous_heartbeat
from activities.secrets import resolve_secret
from errors import HEALTH_CHECK_FAILED, LOGIN_FAILED, VERSION_MISMATCH
from inventory.model import HttpCheck

SNIPPET = 300


@dataclass(frozen=True)
class HttpCheckResult:
    url: str
    status: int  # 0: no HTTP answer (connection refused, timeout)
    body_snippet: str
    elapsed_ms: int
    node: str = ""  # X-Node response header, when the application sets one
    error: str = ""  # transport error when status is 0


def _url(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + (path if path.startswith("/") else "/" + path)


async def fetch(method: str, url: str, timeout_s: float, json_body: object | None = None) -> HttpCheckResult:
    """One request; transport errors are returned as status 0 (callers decide)."""
    return (await fetch_full(method, url, timeout_s, json_body))[0]


async def fetch_full(
    method: str,
    url: str,
    timeout_s: float,
    json_body: object | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[HttpCheckResult, str]:
    """Like fetch, plus the whole body; `headers` are sent with the request."""
    started = time.monotonic()
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, url, json=json_body, headers=headers, allow_redirects=False) as resp,
        ):
            body = await resp.text(errors="replace")
            return HttpCheckResult(
                url=url,
                status=resp.status,
                body_snippet=body[:SNIPPET],
                elapsed_ms=int((time.monotonic() - started) * 1000),
                node=resp.headers.get("X-Node", ""),
            ), body
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        err = str(e) or type(e).__name__
        if isinstance(e, asyncio.TimeoutError):
            err = f"no answer within {timeout_s:g}s"
        return HttpCheckResult(
            url=url, status=0, body_snippet="", elapsed_ms=int((time.monotonic() - started) * 1000), error=err
        ), ""


def _describe(r: HttpCheckResult) -> str:
    if r.status == 0:
        return f"no HTTP answer ({r.error})"
    body = r.body_snippet.strip().replace("\n", " ")[:200]
    return f"status {r.status}" + (f", body {body!r}" if body else "")


async def check(base_url: str, chk: HttpCheck, timeout_s: float) -> HttpCheckResult:
    r = await fetch("GET", _url(base_url, chk.path), timeout_s)
    if r.status != chk.expect_status:
        fail(HEALTH_CHECK_FAILED, f"GET {r.url}: expected status {chk.expect_status}, got {_describe(r)}")
    return r


@dataclass(frozen=True)
class WaitHealthyResult:
    url: str
    waited_s: float
    attempts: int
    last: HttpCheckResult


async def poll_healthy(
    base_url: str,
    chk: HttpCheck,
    timeout_s: float,
    consecutive: int,
    interval_s: float,
    request_timeout_s: float = 5.0,
) -> WaitHealthyResult:
    url = _url(base_url, chk.path)
    prev = previous_heartbeat()
    # Keep the first attempt's clock across retries (the deadline is for the whole step).
    carried = float(prev.get("waited_s", 0.0)) if isinstance(prev, dict) else 0.0
    started = time.monotonic()
    streak = attempts = 0
    while True:
        attempts += 1
        remaining = timeout_s - carried - (time.monotonic() - started)
        r = await fetch("GET", url, max(0.5, min(request_timeout_s, remaining)))
        streak = streak + 1 if r.status == chk.expect_status else 0
        waited = carried + time.monotonic() - started
        if streak >= max(1, consecutive):
            return WaitHealthyResult(url=url, waited_s=round(waited, 3), attempts=attempts, last=r)
        if waited >= timeout_s:
            fail(
                HEALTH_CHECK_FAILED,
                f"GET {url}: not healthy within {timeout_s:g}s ({attempts} attempts, wanted "
                f"{consecutive} consecutive {chk.expect_status}); last: {_describe(r)}",
            )
        heartbeat({"waited_s": round(waited, 2), "status": r.status, "streak": streak})
        await asyncio.sleep(min(interval_s, max(0.0, timeout_s - waited)))


async def version_of(base_url: str, chk: HttpCheck, timeout_s: float) -> str:
    r, body = await fetch_full("GET", _url(base_url, chk.path), timeout_s)
    if r.status != chk.expect_status:
        fail(HEALTH_CHECK_FAILED, f"GET {r.url}: expected status {chk.expect_status}, got {_describe(r)}")
    text = body.strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if isinstance(data, dict) and "version" in data:
        return str(data["version"])
    return text


@dataclass(frozen=True)
class LoginResult:
    url: str
    status: int
    elapsed_ms: int
    node: str = ""


async def login(base_url: str, chk: HttpCheck, timeout_s: float) -> LoginResult:
    url = _url(base_url, chk.path)
    if not chk.user or chk.password is None:
        fail(LOGIN_FAILED, f"POST {url}: the login check needs a user and a password reference")
    password = resolve_secret(chk.password, needed_by=f"login check {url}")
    r = await fetch("POST", url, timeout_s, json_body={"user": chk.user, "password": password})
    if r.status != chk.expect_status:
        # The body is the application's answer; the password is never part of the message.
        fail(
            LOGIN_FAILED,
            f"POST {url} as {chk.user!r}: expected status {chk.expect_status}, got {_describe(r)}".replace(
                password, "***"
            ),
        )
    return LoginResult(url=url, status=r.status, elapsed_ms=r.elapsed_ms, node=r.node)


# --------------------------------------------------------------------------- activities


@dataclass(frozen=True)
class HttpCheckRequest:
    base_url: str
    check: HttpCheck
    timeout_s: float = 5.0


@dataclass(frozen=True)
class WaitHealthyRequest:
    base_url: str
    check: HttpCheck
    timeout_s: float = 60.0
    consecutive: int = 2
    interval_s: float = 0.5


@dataclass(frozen=True)
class VersionRequest:
    base_url: str
    check: HttpCheck
    # When set: VersionMismatch unless the reported version equals it.
    expect: str | None = None
    timeout_s: float = 5.0


@dataclass(frozen=True)
class LoginRequest:
    base_url: str
    check: HttpCheck
    timeout_s: float = 5.0


@activity.defn
async def check_health(req: HttpCheckRequest) -> HttpCheckResult:
    return await check(req.base_url, req.check, req.timeout_s)


@activity.defn
async def wait_healthy(req: WaitHealthyRequest) -> WaitHealthyResult:
    """Poll (heartbeating) until `consecutive` answers in a row have the expected status."""
    return await poll_healthy(req.base_url, req.check, req.timeout_s, req.consecutive, req.interval_s)


@activity.defn
async def get_version(req: VersionRequest) -> str:
    v = await version_of(req.base_url, req.check, req.timeout_s)
    if req.expect is not None and v != req.expect:
        fail(
            VERSION_MISMATCH,
            f"GET {_url(req.base_url, req.check.path)}: version {v!r}, expected {req.expect!r}",
        )
    return v


@activity.defn
async def check_login(req: LoginRequest) -> LoginResult:
    return await login(req.base_url, req.check, req.timeout_s)


@dataclass(frozen=True)
class ServingRequest:
    """One server, asked directly: healthy (`consecutive` good answers in a row, `interval_s`
    apart, within `timeout_s`), on `expect` version, and, with a login check, a user can log
    on. What SiteProcedure.check_running asks in three activities, in one: inside a
    maintenance window every round trip is downtime."""

    base_url: str
    health: HttpCheck
    version: HttpCheck
    expect: str
    login: HttpCheck | None = None
    timeout_s: float = 60.0
    consecutive: int = 2
    interval_s: float = 0.05


@dataclass(frozen=True)
class ServingResult:
    health: WaitHealthyResult
    version: str
    login: LoginResult | None


@activity.defn
async def check_serving(req: ServingRequest) -> ServingResult:
    """Healthy, the expected version, a user can log on (HealthCheckFailed, VersionMismatch,
    LoginFailed otherwise); heartbeats while it waits for health."""
    healthy = await poll_healthy(req.base_url, req.health, req.timeout_s, req.consecutive, req.interval_s)
    v = await version_of(req.base_url, req.version, 5.0)
    if v != req.expect:
        fail(
            VERSION_MISMATCH,
            f"GET {_url(req.base_url, req.version.path)}: version {v!r}, expected {req.expect!r}",
        )
    logged_on = await login(req.base_url, req.login, 5.0) if req.login is not None else None
    return ServingResult(health=healthy, version=v, login=logged_on)
