"""The lab's F5 BIG-IP stand-in (lab/f5) against the session lab's real HAProxy: iControl
REST over HTTPS verified with the lab CA, token login / use / extension / deletion / expiry /
per-user limit, pool members enabled, disabled (drain) and forced offline reaching HAProxy's
admin state and back, statistics following HAProxy's counters during a slow request,
BIG-IP's error texts, the simulated restarts and a pool's serviceDownAction.

The stand-in is started for this module with a short token lifetime (and put back as it was
after); every test leaves HAProxy as after start (tests/haproxy_support.py `restore`) and the
stand-in without a pending restart or changed pool settings.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from lab import haproxy
from lab.config import BACKEND, LabConfig
from lab.f5 import facts
from lab.f5 import lab as lab_f5
from tests.haproxy_support import restore  # noqa: F401  (autouse fixture)

LIFETIME_S = 60
POOL = f"/mgmt/tm/ltm/pool/~Common~{lab_f5.POOL}"


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    body: Any  # parsed JSON, or the text when the answer is not JSON


class F5:
    """A small iControl REST client for the tests: HTTPS verified with the lab CA."""

    def __init__(self, lab: LabConfig, session: aiohttp.ClientSession) -> None:
        self.lab = lab
        self.session = session
        self.base = lab_f5.base_url(lab)
        self.password = lab_f5.password(lab)
        self.issued: list[str] = []  # deleted after the test: the per-user limit counts them

    async def call(
        self, method: str, path: str, token: str | None = None, body: Any = None, data: str | None = None
    ) -> Answer:
        headers = {"X-F5-Auth-Token": token} if token else {}
        async with self.session.request(method, self.base + path, headers=headers, json=body, data=data) as r:
            text = await r.text()
            parsed: Any = await r.json() if r.content_type == "application/json" else text
            return Answer(r.status, r.reason or "", parsed)

    async def login(self, password: str | None = None) -> Answer:
        body = {"username": lab_f5.USER, "password": password or self.password, "loginProviderName": "tmos"}
        return await self.call("POST", facts.LOGIN_PATH, body=body)

    async def token(self) -> str:
        answer = await self.login()
        assert answer.status == 200, answer
        self.issued.append(str(answer.body["token"]["token"]))
        return self.issued[-1]

    async def member(self, token: str, i: int, suffix: str = "") -> Answer:
        return await self.call(
            "GET", f"{POOL}/members/~Common~{lab_f5.member_name(self.lab, i)}{suffix}", token
        )

    async def patch_member(self, token: str, i: int, body: Any) -> Answer:
        return await self.call(
            "PATCH", f"{POOL}/members/~Common~{lab_f5.member_name(self.lab, i)}", token, body
        )


@pytest.fixture(scope="module")
def f5_running(lab: LabConfig) -> Iterator[None]:
    was_running = lab_f5.running(lab)
    lab_f5.stop(lab)
    lab_f5.start(lab, token_lifetime_s=LIFETIME_S)
    try:
        yield
    finally:
        lab_f5.stop(lab)
        if was_running:
            lab_f5.start(lab)


@pytest.fixture
async def f5(lab: LabConfig, f5_running: None) -> AsyncIterator[F5]:
    ctx = ssl.create_default_context(cafile=str(lab_f5.ca_bundle(lab)))
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx), timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        client = F5(lab, session)
        yield client
        lab_f5.reset(lab)
        for text in client.issued:
            await client.call("DELETE", f"{facts.TOKENS_PATH}/{text}", text)


def _haproxy_status(lab: LabConfig, i: int) -> str:
    return haproxy.server_states(lab)[(BACKEND, lab.node_name(i))]


def _scur(lab: LabConfig, i: int) -> int:
    row = next(
        r for r in haproxy.stat_rows(lab) if r["pxname"] == BACKEND and r["svname"] == lab.node_name(i)
    )
    return int(row["scur"] or 0)


# --------------------------------------------------------------------------- tokens


async def test_login_use_extend_and_delete_a_token(f5: F5) -> None:
    answer = await f5.login()
    assert answer.status == 200
    token = answer.body["token"]
    assert answer.body["loginProviderName"] == "tmos" and token["userName"] == lab_f5.USER
    assert token["kind"] == "shared:authz:tokens:authtokenitemstate" and len(token["token"]) == 26
    assert token["timeout"] == LIFETIME_S  # the CLI option; BIG-IP's default is 1200
    assert token["expirationMicros"] - token["lastUpdateMicros"] == pytest.approx(LIFETIME_S * 1e6, abs=1000)
    text = token["token"]
    assert (await f5.call("GET", POOL, text)).status == 200

    extended = await f5.call("PATCH", f"{facts.TOKENS_PATH}/{text}", text, {"timeout": 36000})
    assert extended.status == 200 and extended.body["timeout"] == 36000
    too_long = await f5.call("PATCH", f"{facts.TOKENS_PATH}/{text}", text, {"timeout": "36001"})
    assert too_long.status == 406
    assert too_long.body["message"] == "Auth-token absolute timeout (36000 seconds) exceeded"

    assert (await f5.call("DELETE", f"{facts.TOKENS_PATH}/{text}", text)).status == 200
    gone = await f5.call("GET", POOL, text)
    assert gone.status == 401 and gone.reason == "F5 Authorization Required"
    assert (
        gone.body["message"] == "X-F5-Auth-Token does not exist."
        and gone.body["kind"] == ":resterrorresponse"
    )


async def test_wrong_password_no_credentials_and_basic_auth(f5: F5) -> None:
    wrong = await f5.login(password="not-the-password")
    assert wrong.status == 401 and wrong.reason == "F5 Authorization Required"
    assert wrong.body["kind"] == ":resterrorresponse" and "password" not in wrong.body["originalRequestBody"]
    bare = await f5.call("GET", POOL)
    assert bare.status == 401
    assert bare.body["message"].startswith(
        "Authorization failed: no user authentication header or token detected."
    )
    basic = base64.b64encode(f"{lab_f5.USER}:{f5.password}".encode()).decode()
    async with f5.session.get(f5.base + POOL, headers={"Authorization": f"Basic {basic}"}) as r:
        assert r.status == 200 and (await r.json())["name"] == lab_f5.POOL
    wrong_basic = base64.b64encode(f"{lab_f5.USER}:nope".encode()).decode()
    async with f5.session.get(f5.base + POOL, headers={"Authorization": f"Basic {wrong_basic}"}) as r:
        assert r.status == 401


async def test_an_expired_token_answers_401(f5: F5) -> None:
    text = await f5.token()
    answer = await f5.call("PATCH", f"{facts.TOKENS_PATH}/{text}", text, {"timeout": 1})
    assert answer.status == 200
    await asyncio.sleep(1.1)
    expired = await f5.call("GET", POOL, text)
    assert expired.status == 401 and expired.body["message"] == "X-F5-Auth-Token has expired."


async def test_a_user_has_at_most_100_tokens(f5: F5) -> None:
    tokens = [await f5.token() for _ in range(facts.MAX_TOKENS_PER_USER)]
    refused = await f5.login()
    assert refused.status == 400
    assert (
        refused.body["message"]
        == f"user {facts.user_uuid(lab_f5.USER)} has reached maximum active login tokens"
    )
    await f5.call("DELETE", f"{facts.TOKENS_PATH}/{tokens[0]}", tokens[1])
    await f5.token()  # one freed, one more allowed


def test_the_user_uuid_is_bigips() -> None:
    # K59142111's example names admin's UUID; the stand-in derives it the same way.
    assert facts.user_uuid("admin") == "21232f29-7a57-35a7-8389-4a0e4a801fc3"


# --------------------------------------------------------------------------- members and HAProxy


async def test_disable_force_offline_and_enable_reach_haproxy(lab: LabConfig, f5: F5) -> None:
    token = await f5.token()
    member = (await f5.member(token, 1)).body
    assert member["kind"] == "tm:ltm:pool:members:membersstate"
    assert member["fullPath"] == f"/Common/{lab_f5.member_name(lab, 1)}" and member["address"] == "127.0.0.1"
    assert (member["session"], member["state"]) == ("monitor-enabled", "up")

    drained = await f5.patch_member(token, 1, {"session": "user-disabled", "state": "user-up"})
    assert (drained.body["session"], drained.body["state"]) == ("user-disabled", "up")
    assert _haproxy_status(lab, 1) == "DRAIN"

    offline = await f5.patch_member(token, 1, {"session": "user-disabled", "state": "user-down"})
    assert (offline.body["session"], offline.body["state"]) == ("user-disabled", "user-down")
    assert _haproxy_status(lab, 1) == "MAINT"

    enabled = await f5.patch_member(token, 1, {"session": "user-enabled", "state": "user-up"})
    assert enabled.body["session"] == "monitor-enabled" and enabled.status == 200
    assert not _haproxy_status(lab, 1).startswith(("MAINT", "DRAIN"))
    listed = await f5.call("GET", f"{POOL}/members", token)
    assert [m["name"] for m in listed.body["items"]] == [lab_f5.member_name(lab, i) for i in lab.node_indexes]


async def test_stats_follow_haproxy_during_a_slow_request(lab: LabConfig, f5: F5) -> None:
    token = await f5.token()
    others = [i for i in lab.node_indexes if i != 1]
    for i in others:  # only node1 takes new sessions
        await f5.patch_member(token, i, {"session": "user-disabled"})
    async with aiohttp.ClientSession() as plain:
        slow = asyncio.ensure_future(plain.get(f"{lab.main_url}/slow?ms=1500"))
        deadline = time.monotonic() + 5
        while True:
            stats = (await f5.member(token, 1, "/stats")).body
            (entry,) = stats["entries"].values()
            entries = entry["nestedStats"]["entries"]
            if entries["serverside.curConns"]["value"] >= 1:
                break
            assert time.monotonic() < deadline, "node1 had no session within 5 s"
            await asyncio.sleep(0.05)
        assert entries["serverside.curConns"]["value"] == entries["curSessions"]["value"] == _scur(lab, 1)
        resp = await slow
        assert resp.status == 200 and resp.headers["X-Served-By"] == lab.node_name(1)
        resp.release()
    assert stats["kind"] == "tm:ltm:pool:members:membersstats"
    assert entries["status.availabilityState"]["description"] == "available"
    assert entries["status.enabledState"]["description"] == "enabled"
    drained = (await f5.member(token, 2, "/stats")).body
    (entry,) = drained["entries"].values()
    assert entry["nestedStats"]["entries"]["status.statusReason"]["description"] == (
        "Pool member is available, user disabled"
    )


# --------------------------------------------------------------------------- errors and the pool


async def test_not_found_and_bad_bodies_answer_bigips_texts(lab: LabConfig, f5: F5) -> None:
    token = await f5.token()
    missing = await f5.call("GET", f"{POOL}/members/~Common~node9:80", token)
    assert missing.status == 404
    assert missing.body["message"] == (
        f"01020036:3: The requested Pool Member (/Common/{lab_f5.POOL} /Common/node9 80) was not found."
    )
    no_pool = await f5.call("GET", "/mgmt/tm/ltm/pool/~Common~nopool", token)
    assert no_pool.status == 404
    assert no_pool.body["message"] == "01020036:3: The requested Pool (/Common/nopool) was not found."
    bad_json = await f5.call(
        "PATCH", f"{POOL}/members/~Common~{lab_f5.member_name(lab, 1)}", token, data="{oops"
    )
    assert bad_json.status == 400 and bad_json.body["message"] == "Found invalid JSON body in the request."
    empty = await f5.patch_member(token, 1, {})
    assert empty.status == 400 and empty.body["message"] == "one or more properties must be specified"
    bad_state = await f5.patch_member(token, 1, {"state": "down"})
    assert bad_state.status == 400 and _haproxy_status(lab, 1).startswith("UP")


async def test_restarts_answer_as_bigip_does(f5: F5) -> None:
    token = await f5.token()
    lab_f5.simulate_restart(f5.lab, 2)
    for _ in range(2):
        answer = await f5.call("GET", POOL, token)
        assert answer.status == 503 and "Configuration Utility restarting..." in answer.body
    assert (await f5.call("GET", POOL, token)).status == 200
    lab_f5.simulate_restart(f5.lab, 1, "mcpd")
    assert (await f5.login()).status == 200  # restjavad answers while mcpd restarts
    lost = await f5.call("GET", POOL, token)
    assert lost.status == 500 and lost.body["message"] == "The connection to mcpd has been lost, try again."
    assert (await f5.call("GET", POOL, token)).status == 200


async def test_service_down_action_is_stored(f5: F5) -> None:
    token = await f5.token()
    assert (await f5.call("GET", POOL, token)).body["serviceDownAction"] == "none"
    changed = await f5.call("PATCH", POOL, token, {"serviceDownAction": "reset"})
    assert changed.status == 200 and changed.body["serviceDownAction"] == "reset"
    assert (await f5.call("GET", POOL, token)).body["serviceDownAction"] == "reset"
    assert (await f5.call("PATCH", POOL, token, {"serviceDownAction": "reject"})).status == 400
