"""The application's admin interface: maintenance mode, the upgrade settings, the audit.

Secret Server's manual rolling upgrade is driven from its admin pages: enable maintenance
mode, "ignore version mismatch", record each wizard step as a `ManualUpgrade` audit. The
lab application offers the same over HTTP (lab/app/app.py, under `AdminApi.path_prefix`):

* ``GET  <prefix>/state``     the node's effective settings, versions and schemas
* ``POST <prefix>/settings``  set (never toggle) site or node settings; answers the new state
* ``GET|POST <prefix>/audit`` ManualUpgrade audit rows; a POST is idempotent by `reference`

Every request carries ``Authorization: Bearer <token>``; the token is resolved from its
`SecretRef` here, right before use, and never appears in a result or a message. Requests
name a `base_url`, so the same activities serve production nodes and the staging system.

Errors: `AdminAuthFailed` (401: wrong or missing token, no admin.config; non-retryable),
`AdminUnavailable` (no answer, 5xx: retryable; 404, no admin interface there: not),
`InvalidRequest` (refused by the application, or a bad request built by the workflow),
`SettingsTimeout` (app_wait_settings passed its deadline).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from temporalio import activity

from activities.common import fail, heartbeat, previous_heartbeat
from activities.secrets import resolve_secret
from errors import ADMIN_AUTH_FAILED, ADMIN_UNAVAILABLE, INVALID_REQUEST, SETTINGS_TIMEOUT
from inventory.model import AdminApi

SCOPES = ("site", "node")
# Secret Server's ManualUpgrade audit actions (seed "New Audit Type").
AUDIT_ACTIONS = (
    "STARTED",
    "VERIFY DELTAS",
    "GENERATE UPGRADE ZIP",
    "GENERATE DB SCRIPT",
    "STAGING TEST",
    "COMPLETED",
    "CANCEL",
)
SNIPPET = 300


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class UpgradeSettings:
    """The site's values (tbUpgradeSettings row '*')."""

    maintenance_mode: bool
    ignore_version_mismatch: bool
    enforce_version_match: bool


@dataclass(frozen=True)
class NodeOverride:
    """A node's own values; None: the site's value applies."""

    maintenance_mode: bool | None = None
    ignore_version_mismatch: bool | None = None


@dataclass(frozen=True)
class AdminState:
    node: str
    version: str
    code_schema: int
    db_schema: int
    # Effective on this node (its override where set, else the site's).
    maintenance_mode: bool
    ignore_version_mismatch: bool
    enforce_version_match: bool
    # The code's schema differs from the database's.
    mismatch: bool
    # ... and this node serves the version mismatch page for it (enforced, not ignored).
    mismatch_page: bool
    site: UpgradeSettings
    node_override: NodeOverride | None = None


@dataclass(frozen=True)
class AuditEvent:
    audit_id: int
    audit_type: str
    action: str
    notes: str
    user: str
    reference: str
    date_recorded: str  # ISO 8601, UTC
    # False when a row with this reference already existed (a repeated record).
    created: bool = False


@dataclass(frozen=True)
class AdminRequest:
    base_url: str
    admin: AdminApi
    timeout_s: float = 10.0


@dataclass(frozen=True)
class SettingsRequest:
    """Set settings; None leaves a value as it is. scope "node": the node at `base_url`;
    clear_node_override: values not given become "use the site's" (and a node row with
    nothing left is deleted). enforce_version_match is a site setting."""

    base_url: str
    admin: AdminApi
    scope: str
    maintenance_mode: bool | None = None
    ignore_version_mismatch: bool | None = None
    enforce_version_match: bool | None = None
    clear_node_override: bool = False
    timeout_s: float = 10.0


@dataclass(frozen=True)
class WaitSettingsRequest:
    """Wait until the node at `base_url` reports these effective values."""

    base_url: str
    admin: AdminApi
    maintenance_mode: bool
    ignore_version_mismatch: bool
    timeout_s: float = 60.0
    interval_s: float = 0.5


@dataclass(frozen=True)
class AuditRequest:
    base_url: str
    admin: AdminApi
    action: str
    notes: str = ""
    user: str = ""
    # Idempotency key: a repeat with the same reference returns the row recorded first.
    reference: str = ""
    timeout_s: float = 10.0


# --------------------------------------------------------------------------- HTTP


def _url(req_base: str, admin: AdminApi, path: str) -> str:
    return req_base.rstrip("/") + admin.path_prefix.rstrip("/") + path


def _error_text(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:SNIPPET]
    if isinstance(data, dict) and "error" in data:
        return str(data["error"])[:SNIPPET]
    return body.strip()[:SNIPPET]


async def call(
    base_url: str,
    admin: AdminApi,
    method: str,
    path: str,
    timeout_s: float,
    body: dict[str, Any] | None = None,
) -> Any:
    """One admin request; the decoded JSON answer, or a typed error."""
    url = _url(base_url, admin, path)
    token = resolve_secret(admin.token, needed_by=f"admin interface {url}")
    what = f"{method} {url}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.request(
                method, url, json=body, allow_redirects=False, headers={"Authorization": f"Bearer {token}"}
            ) as resp,
        ):
            status, text = resp.status, await resp.text(errors="replace")
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        err = (
            f"no answer within {timeout_s:g}s"
            if isinstance(e, asyncio.TimeoutError)
            else (str(e) or type(e).__name__)
        )
        fail(ADMIN_UNAVAILABLE, f"{what}: {err}".replace(token, "***"), retryable=True, cause=e)
    # The application's answer never holds the token, but a proxy's error page might echo
    # the request: scrub it from everything that becomes a message.
    detail = _error_text(text).replace(token, "***")
    if status == 401 or status == 403:
        fail(ADMIN_AUTH_FAILED, f"{what}: refused ({status}): {detail}")
    if status == 404:
        fail(
            ADMIN_UNAVAILABLE,
            f"{what}: no admin interface there (404); is path_prefix "
            f"{admin.path_prefix!r} right and does this release have one?",
        )
    if status in (400, 409, 422):
        fail(INVALID_REQUEST, f"{what}: refused ({status}): {detail}")
    if status >= 500:
        fail(ADMIN_UNAVAILABLE, f"{what}: status {status}: {detail}", retryable=True)
    if not 200 <= status < 300:
        fail(ADMIN_UNAVAILABLE, f"{what}: unexpected status {status}: {detail}")
    try:
        return json.loads(text)
    except ValueError:
        fail(
            ADMIN_UNAVAILABLE,
            f"{what}: answer is not JSON: {text[:SNIPPET]!r}".replace(token, "***"),
            retryable=True,
        )


def _opt_bool(v: Any) -> bool | None:
    return None if v is None else bool(v)


def parse_state(data: Any, where: str) -> AdminState:
    if not isinstance(data, dict):
        fail(ADMIN_UNAVAILABLE, f"{where}: expected a JSON object, got {type(data).__name__}", retryable=True)
    try:
        site = data["site"]
        override = data.get("node_override")
        return AdminState(
            node=str(data["node"]),
            version=str(data["version"]),
            code_schema=int(data["code_schema"]),
            db_schema=int(data["db_schema"]),
            maintenance_mode=bool(data["maintenance_mode"]),
            ignore_version_mismatch=bool(data["ignore_version_mismatch"]),
            enforce_version_match=bool(data["enforce_version_match"]),
            mismatch=bool(data["mismatch"]),
            mismatch_page=bool(data.get("mismatch_page", False)),
            site=UpgradeSettings(
                maintenance_mode=bool(site["maintenance_mode"]),
                ignore_version_mismatch=bool(site["ignore_version_mismatch"]),
                enforce_version_match=bool(site["enforce_version_match"]),
            ),
            node_override=NodeOverride(
                maintenance_mode=_opt_bool(override.get("maintenance_mode")),
                ignore_version_mismatch=_opt_bool(override.get("ignore_version_mismatch")),
            )
            if isinstance(override, dict)
            else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        fail(
            ADMIN_UNAVAILABLE, f"{where}: unexpected state document ({type(e).__name__}: {e})", retryable=True
        )


def parse_audit(data: Any, where: str) -> AuditEvent:
    try:
        return AuditEvent(
            audit_id=int(data["audit_id"]),
            audit_type=str(data["audit_type"]),
            action=str(data["action"]),
            notes=str(data.get("notes") or ""),
            user=str(data.get("user") or ""),
            reference=str(data.get("reference") or ""),
            date_recorded=str(data["date_recorded"]),
            created=bool(data.get("created", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        fail(ADMIN_UNAVAILABLE, f"{where}: unexpected audit row ({type(e).__name__}: {e})", retryable=True)


# --------------------------------------------------------------------------- verbs


async def get_state(base_url: str, admin: AdminApi, timeout_s: float = 10.0) -> AdminState:
    data = await call(base_url, admin, "GET", "/state", timeout_s)
    return parse_state(data, _url(base_url, admin, "/state"))


def settings_body(req: SettingsRequest) -> dict[str, Any]:
    """The POST body for `req`; InvalidRequest for combinations the application refuses."""
    if req.scope not in SCOPES:
        fail(INVALID_REQUEST, f"settings scope {req.scope!r}: expected one of {', '.join(SCOPES)}")
    if req.scope == "site" and req.clear_node_override:
        fail(INVALID_REQUEST, "clear_node_override applies to scope node only")
    if req.scope == "node" and req.enforce_version_match is not None:
        fail(INVALID_REQUEST, "enforce_version_match is a site setting (scope site)")
    body: dict[str, Any] = {"scope": req.scope}
    values = {
        "maintenance_mode": req.maintenance_mode,
        "ignore_version_mismatch": req.ignore_version_mismatch,
    }
    if req.scope == "site":
        values["enforce_version_match"] = req.enforce_version_match
    for key, v in values.items():
        if v is not None or req.clear_node_override:
            body[key] = v  # with clear_node_override, None becomes null: "use the site's"
    return body


async def set_settings(req: SettingsRequest) -> AdminState:
    body = settings_body(req)
    data = await call(req.base_url, req.admin, "POST", "/settings", req.timeout_s, body)
    state = parse_state(data, _url(req.base_url, req.admin, "/settings"))
    # The answer is read back after the write: check it took (a node answering for another
    # scope, a stale cache) rather than trust the request.
    want = {k: v for k, v in body.items() if k != "scope"}
    got: dict[str, bool | None]
    if req.scope == "site":
        got = {
            "maintenance_mode": state.site.maintenance_mode,
            "ignore_version_mismatch": state.site.ignore_version_mismatch,
            "enforce_version_match": state.site.enforce_version_match,
        }
    else:
        o = state.node_override or NodeOverride()
        got = {"maintenance_mode": o.maintenance_mode, "ignore_version_mismatch": o.ignore_version_mismatch}
    wrong = {k: (v, got.get(k)) for k, v in want.items() if got.get(k) != v}
    if wrong:
        fail(
            ADMIN_UNAVAILABLE,
            f"POST {_url(req.base_url, req.admin, '/settings')}: settings read back "
            f"differ (wanted, got): {wrong}",
            retryable=True,
        )
    return state


async def wait_settings(req: WaitSettingsRequest) -> AdminState:
    """Poll the node's state until its effective values are the wanted ones (heartbeating;
    the deadline is kept across retries of the activity)."""
    prev = previous_heartbeat()
    carried = float(prev.get("waited_s", 0.0)) if isinstance(prev, dict) else 0.0
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        remaining = req.timeout_s - carried - (time.monotonic() - started)
        state = await get_state(req.base_url, req.admin, max(0.5, min(10.0, remaining)))
        if (state.maintenance_mode, state.ignore_version_mismatch) == (
            req.maintenance_mode,
            req.ignore_version_mismatch,
        ):
            return state
        waited = carried + time.monotonic() - started
        if waited >= req.timeout_s:
            fail(
                SETTINGS_TIMEOUT,
                f"{req.base_url} ({state.node}): maintenance_mode={state.maintenance_mode}, "
                f"ignore_version_mismatch={state.ignore_version_mismatch} after {req.timeout_s:g}s "
                f"({attempts} reads); wanted {req.maintenance_mode}, {req.ignore_version_mismatch}",
            )
        heartbeat(
            {
                "waited_s": round(waited, 2),
                "maintenance_mode": state.maintenance_mode,
                "ignore_version_mismatch": state.ignore_version_mismatch,
            }
        )
        await asyncio.sleep(min(req.interval_s, max(0.0, req.timeout_s - waited)))


async def record_audit(req: AuditRequest) -> AuditEvent:
    if req.action not in AUDIT_ACTIONS:
        fail(INVALID_REQUEST, f"audit action {req.action!r}: expected one of {', '.join(AUDIT_ACTIONS)}")
    body: dict[str, Any] = {"action": req.action}
    for key, v in (("notes", req.notes), ("user", req.user), ("reference", req.reference)):
        if v:
            body[key] = v
    url = _url(req.base_url, req.admin, "/audit")
    return parse_audit(await call(req.base_url, req.admin, "POST", "/audit", req.timeout_s, body), url)


async def list_audit(base_url: str, admin: AdminApi, timeout_s: float = 10.0) -> tuple[AuditEvent, ...]:
    url = _url(base_url, admin, "/audit")
    data = await call(base_url, admin, "GET", "/audit", timeout_s)
    if not isinstance(data, list):
        fail(ADMIN_UNAVAILABLE, f"GET {url}: expected a JSON list", retryable=True)
    return tuple(parse_audit(row, url) for row in data)


# --------------------------------------------------------------------------- activities


@activity.defn
async def app_admin_state(req: AdminRequest) -> AdminState:
    return await get_state(req.base_url, req.admin, req.timeout_s)


@activity.defn
async def app_set_settings(req: SettingsRequest) -> AdminState:
    """Set (idempotent) and return the state read back from the node."""
    return await set_settings(req)


@activity.defn
async def app_wait_settings(req: WaitSettingsRequest) -> AdminState:
    return await wait_settings(req)


@activity.defn
async def app_record_audit(req: AuditRequest) -> AuditEvent:
    return await record_audit(req)
