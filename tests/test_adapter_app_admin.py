"""The product's admin-interface adapter (activities/app_admin.py) against the lab
application's admin interface on the running session lab: its errors (a wrong token, an unset
secret, no admin interface at the path, no answer; after the lab's own 401s without the token),
the settings' validation (requests the application refuses, refused before they are sent;
setting twice is setting once; the lab's 400s for bad bodies), app_wait_settings' heartbeats
and timeout, and the ManualUpgrade audit (idempotent by reference, ordered, bad actions and a
reused reference refused). The lab application's own Secret Server behaviour is tested in
tests/test_lab_secret_server.py.

The lab is shared by the whole session: every test starts and ends with the Secret Server
side at its defaults (`site_defaults`, tests/app_admin_support.py). Activities run inside
temporalio's ActivityEnvironment (no worker) or as the plain functions they wrap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import app_admin
from activities.app_admin import (
    AuditRequest,
    SettingsRequest,
    WaitSettingsRequest,
)
from inventory.model import AdminApi, SecretRef
from lab.config import LabConfig
from tests.app_admin_support import admin_api, node_url, request, site_defaults  # noqa: F401  (fixture)

# --------------------------------------------------------------------------- admin interface


async def test_admin_interface_refuses_without_the_token(lab: LabConfig, tmp_path: Path) -> None:
    base = node_url(lab, 1)
    token = lab.admin_token_file.read_text().strip()
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": "Bearer "},
    ):
        for method, path in (
            ("GET", "/admin/state"),
            ("POST", "/admin/settings"),
            ("GET", "/admin/audit"),
            ("POST", "/admin/audit"),
        ):
            status, body, h = await request(
                method,
                base + path,
                headers=headers,
                json_body={"scope": "site", "maintenance_mode": True} if method == "POST" else None,
            )
            assert status == 401 and h["WWW-Authenticate"] == "Bearer", (headers, path, body)
    assert (await request("GET", f"{base}/admin/state", token=token))[0] == 200
    assert (await app_admin.get_state(base, admin_api(lab))).site.maintenance_mode is False  # nothing set

    wrong = tmp_path / "wrong_token"
    wrong.write_text("not-the-token\n")
    with pytest.raises(ApplicationError) as info:
        await app_admin.get_state(base, AdminApi(token=SecretRef(file=str(wrong))))
    assert info.value.type == "AdminAuthFailed" and info.value.non_retryable
    with pytest.raises(ApplicationError) as info:
        await app_admin.get_state(base, AdminApi(token=SecretRef(env="ZERODOWN_TEST_UNSET_TOKEN")))
    assert info.value.type == "SecretUnavailable"
    with pytest.raises(ApplicationError) as info:
        await app_admin.get_state(
            base, AdminApi(token=SecretRef(file=str(lab.admin_token_file)), path_prefix="/nope")
        )
    assert info.value.type == "AdminUnavailable" and info.value.non_retryable
    with pytest.raises(ApplicationError) as info:
        await app_admin.get_state(f"http://127.0.0.1:{lab.port_base + 99}", admin_api(lab))
    assert info.value.type == "AdminUnavailable" and not info.value.non_retryable
    assert token not in str(info.value)


async def test_settings_validation(lab: LabConfig) -> None:
    base, token = node_url(lab, 1), lab.admin_token_file.read_text().strip()
    for body in (
        {"scope": "everywhere"},
        {"scope": "site", "maintenance_mode": None},
        {"scope": "site", "maintenance_mode": 1},
        {"scope": "node", "enforce_version_match": True},
        {"scope": "site", "colour": "blue"},
        ["not", "an", "object"],
    ):
        status, text, _ = await request("POST", f"{base}/admin/settings", token=token, json_body=body)
        assert status == 400 and "error" in json.loads(text), (body, text)
    api = admin_api(lab)
    for bad in (
        SettingsRequest(base, api, "node", enforce_version_match=True),
        SettingsRequest(base, api, "site", clear_node_override=True),
        SettingsRequest(base, api, "cluster"),
    ):
        with pytest.raises(ApplicationError) as info:
            await app_admin.set_settings(bad)
        assert info.value.type == "InvalidRequest"
    # Setting twice is the same as once (set, not toggle); absent keys stay as they are.
    for _ in range(2):
        state = await app_admin.set_settings(SettingsRequest(base, api, "site", ignore_version_mismatch=True))
        assert state.site == app_admin.UpgradeSettings(False, True, False)


async def test_wait_settings_heartbeats_and_times_out(lab: LabConfig) -> None:
    api = admin_api(lab)
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *d: beats.append(d[0] if d else None)
    await app_admin.set_settings(
        SettingsRequest(node_url(lab, 3), api, "node", maintenance_mode=True, ignore_version_mismatch=True)
    )
    state = await env.run(
        app_admin.app_wait_settings, WaitSettingsRequest(node_url(lab, 3), api, True, True, 5)
    )
    assert (state.node, state.maintenance_mode, state.ignore_version_mismatch) == ("node3", True, True)
    with pytest.raises(ApplicationError) as info:
        await env.run(
            app_admin.app_wait_settings, WaitSettingsRequest(node_url(lab, 4), api, True, True, 1.5, 0.2)
        )
    assert info.value.type == "SettingsTimeout" and "node4" in str(info.value)
    assert beats and all(isinstance(b, dict) and "waited_s" in b for b in beats)
    state = await env.run(
        app_admin.app_set_settings, SettingsRequest(node_url(lab, 3), api, "node", clear_node_override=True)
    )
    assert state.node_override is None and state.maintenance_mode is False


async def test_audit_is_idempotent_by_reference_and_ordered(lab: LabConfig) -> None:
    api = admin_api(lab)
    env = ActivityEnvironment()
    first = await env.run(
        app_admin.app_record_audit,
        AuditRequest(
            node_url(lab, 1),
            api,
            "STARTED",
            notes="2.0.0 from 1.0.0",
            user="alice",
            reference="run-1/started",
        ),
    )
    assert first.created
    assert (first.audit_type, first.action, first.user) == ("ManualUpgrade", "STARTED", "alice")
    second = await env.run(
        app_admin.app_record_audit,
        AuditRequest(node_url(lab, 2), api, "VERIFY DELTAS", reference="run-1/verify"),
    )
    # A retried record (any node: they share the database) returns the row recorded first.
    again = await env.run(
        app_admin.app_record_audit,
        AuditRequest(node_url(lab, 3), api, "STARTED", notes="retried", reference="run-1/started"),
    )
    assert again.audit_id == first.audit_id and not again.created and again.notes == "2.0.0 from 1.0.0"
    # Without a reference every call records a row.
    cancel = await app_admin.record_audit(AuditRequest(node_url(lab, 1), api, "CANCEL"))
    cancel2 = await app_admin.record_audit(AuditRequest(node_url(lab, 1), api, "CANCEL"))
    assert cancel.audit_id != cancel2.audit_id
    rows = await app_admin.list_audit(node_url(lab, 4), api)
    assert [(r.audit_id, r.action) for r in rows] == [
        (first.audit_id, "STARTED"),
        (second.audit_id, "VERIFY DELTAS"),
        (cancel.audit_id, "CANCEL"),
        (cancel2.audit_id, "CANCEL"),
    ]
    assert [r.audit_id for r in rows] == sorted(r.audit_id for r in rows)
    assert rows[0].date_recorded.endswith("Z") and rows[0].reference == "run-1/started"

    for bad in ("DANCE", "started"):
        with pytest.raises(ApplicationError) as info:
            await app_admin.record_audit(AuditRequest(node_url(lab, 1), api, bad))
        assert info.value.type == "InvalidRequest"
    token = lab.admin_token_file.read_text().strip()
    status, _, _ = await request(
        "POST", f"{node_url(lab, 1)}/admin/audit", token=token, json_body={"action": "DANCE"}
    )
    assert status == 400
    status, _, _ = await request(
        "POST",
        f"{node_url(lab, 1)}/admin/audit",
        token=token,
        json_body={"action": "STARTED", "notes": "x" * 1001},
    )
    assert status == 400
    # The same reference for another action is a mistake, not a repeat.
    with pytest.raises(ApplicationError) as info:
        await app_admin.record_audit(
            AuditRequest(node_url(lab, 1), api, "COMPLETED", reference="run-1/started")
        )
    assert info.value.type == "InvalidRequest" and "already used" in str(info.value)
    assert len(await app_admin.list_audit(node_url(lab, 1), api)) == 4
