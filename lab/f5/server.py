"""The iControl REST server: aiohttp over HTTPS, BIG-IP's paths, HAProxy behind.

Auth (restjavad's side, lab/f5/tokens.py): POST /mgmt/shared/authn/login, and GET / PATCH /
DELETE /mgmt/shared/authz/tokens/<token>. Every other call authenticates with the
X-F5-Auth-Token header, or with HTTP basic auth as BIG-IP also accepts for local users
(f5-ansible module_utils/bigip.py connect_via_basic_auth; f5-automation-labs lab 1.2).

LTM (lab/f5/ltm.py): GET/PATCH /mgmt/tm/ltm/pool/~Common~<pool>, GET .../members,
GET .../members/stats, GET/PATCH .../members/~Common~<node>:<port>, GET .../stats.
Path segments take BIG-IP's "~partition~name" form (f5-ansible module_utils transform_name)
or a bare name (partition Common).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from lab.f5 import config, facts, ltm, runtime
from lab.f5.config import MemberSpec, PoolSpec, StandInConfig
from lab.f5.tokens import Token, TokenError, TokenStore

log = logging.getLogger("lab.f5")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Properties a client may send back unchanged with a PATCH (what a GET returned).
READ_ONLY = {"kind", "name", "partition", "fullPath", "generation", "selfLink", "address"}


class Reply(Exception):
    """A finished answer raised from deep inside a handler (errors)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _json(status: int, body: dict[str, Any], reason: str | None = None) -> web.Response:
    return web.json_response(body, status=status, reason=reason)


def _referer(request: web.Request) -> str:
    return request.remote or "127.0.0.1"


def _rest_fail(request: web.Request, status: int, message: str, **extra: Any) -> Reply:
    reason = facts.AUTH_REASON if status == 401 else None
    return Reply(_json(status, facts.rest_error(status, message, _referer(request), **extra), reason))


def _tm_fail(status: int, message: str, api_error: int) -> Reply:
    return Reply(_json(status, facts.tm_error(status, message, api_error)))


def _split(segment: str) -> tuple[str, str]:
    """`~Common~name` -> ("Common", "name"); a bare name is in Common."""
    if segment.startswith("~"):
        partition, _, name = segment[1:].partition("~")
        return partition, name
    return facts.PARTITION, segment


def _basic_credentials(header: str) -> tuple[str, str]:
    """(user, password) of an `Authorization: Basic ...` header; ("", "") when malformed."""
    try:
        decoded = base64.b64decode(header.split(" ", 1)[1].strip(), validate=True).decode("latin1")
    except (IndexError, binascii.Error, ValueError):
        return "", ""
    username, _, password = decoded.partition(":")
    return username, password


class StandIn:
    def __init__(
        self, cfg: StandInConfig, state_dir: Path, haproxy_socket: str, token_lifetime_s: int
    ) -> None:
        self.cfg = cfg
        self.state_dir = state_dir
        self.socket = haproxy_socket
        self.tokens = TokenStore(token_lifetime_s)
        self.generations: dict[str, int] = {}

    # ------------------------------------------------------------------ plumbing

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        tm = "/mgmt/tm/ltm/pool/{pool}"
        app.router.add_post(facts.LOGIN_PATH, self.login)
        app.router.add_route("*", facts.TOKENS_PATH + "/{token}", self.token)
        app.router.add_route("*", tm, self.pool)
        app.router.add_get(tm + "/members", self.members)
        app.router.add_get(tm + "/members/stats", self.members_stats)
        app.router.add_route("*", tm + "/members/{member}", self.member)
        app.router.add_get(tm + "/members/{member}/stats", self.member_stats)
        app.router.add_route("*", "/{tail:.*}", self.unregistered)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        restarting = self._restarting(request)
        if restarting is not None:
            return restarting
        try:
            return await handler(request)
        except Reply as r:
            return r.response

    def _restarting(self, request: web.Request) -> web.Response | None:
        """The lab's restart switch (lab/f5/config.py): restjavad down takes every request,
        mcpd down only the configuration calls (/mgmt/tm)."""
        daemon = config.pending_restart(self.state_dir)
        if daemon is None or (daemon == "mcpd" and not request.path.startswith("/mgmt/tm/")):
            return None
        config.count_off_restart(self.state_dir)
        log.info("answering %s %s as during a %s restart", request.method, request.path, daemon)
        if daemon == "restjavad":
            return web.Response(status=503, text=facts.RESTARTING_PAGE, content_type="text/html")
        return _json(500, facts.tm_error(500, facts.MCPD_LOST_MESSAGE, facts.MCPD_LOST_API_ERROR))

    def _bump(self, link: str) -> int:
        self.generations[link] = self.generations.get(link, 1) + 1
        return self.generations[link]

    def _generation(self, link: str) -> int:
        return self.generations.get(link, 1)

    # ------------------------------------------------------------------ authentication

    def _user_ok(self, username: str, password: str) -> bool:
        known = self.cfg.users.get(username)
        return known is not None and hmac.compare_digest(known.encode(), password.encode())

    def authenticate(self, request: web.Request) -> str:
        """The caller's user name, or a 401 as BIG-IP answers it."""
        text = request.headers.get("X-F5-Auth-Token")
        if text:
            try:
                return self.tokens.check(text).username
            except TokenError as e:
                raise _rest_fail(request, e.status, e.message) from None
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            username, password = _basic_credentials(header)
            if self._user_ok(username, password):
                return username
            raise _rest_fail(request, 401, facts.LOGIN_FAILED_MESSAGE)
        raise _rest_fail(request, 401, facts.no_credentials_message(request.path, _referer(request)))

    async def _json_body(self, request: web.Request, tm: bool) -> dict[str, Any]:
        try:
            body = json.loads(await request.text() or "null")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            if tm:
                raise _tm_fail(400, facts.INVALID_JSON_MESSAGE, facts.INVALID_JSON_API_ERROR)
            raise _rest_fail(request, 400, facts.INVALID_JSON_MESSAGE)
        return body

    async def login(self, request: web.Request) -> web.Response:
        body = await self._json_body(request, tm=False)
        username, password = str(body.get("username", "")), str(body.get("password", ""))
        provider = str(body.get("loginProviderName") or facts.LOGIN_PROVIDER)
        if provider != facts.LOGIN_PROVIDER or not self._user_ok(username, password):
            # BIG-IP echoes the request without the password (f5-ansible #1105).
            echo = {
                "username": username,
                "loginProviderName": provider,
                "generation": 0,
                "lastUpdateMicros": 0,
            }
            original = json.dumps(echo, separators=(",", ":"))
            raise _rest_fail(request, 401, facts.LOGIN_FAILED_MESSAGE, originalRequestBody=original)
        try:
            token = self.tokens.issue(username, _referer(request))
        except TokenError as e:
            raise _rest_fail(request, e.status, e.message) from None
        log.info("login %s: token ...%s, %ss", username, token.token[-4:], token.timeout_s)
        return _json(
            200,
            {
                "username": username,
                "loginReference": {"link": facts.TMOS_LOGIN_REFERENCE},
                "loginProviderName": facts.LOGIN_PROVIDER,
                "token": token.body(),
                "generation": 0,
                "lastUpdateMicros": 0,
            },
        )

    async def token(self, request: web.Request) -> web.Response:
        self.authenticate(request)
        text = request.match_info["token"]
        token = self.tokens.get(text)
        if token is None:
            # The lab's wording: BIG-IP's text for an unknown token here was not found.
            raise _rest_fail(request, 404, f"Token {text} not found")
        if request.method == "GET":
            return _json(200, token.body())
        if request.method == "PATCH":
            return _json(200, (await self._patch_token(request, token)).body())
        if request.method == "DELETE":
            body = token.body()
            self.tokens.delete(token)
            return _json(200, body)
        raise _rest_fail(request, 405, f"{request.method} is not supported on {request.path}")

    async def _patch_token(self, request: web.Request, token: Token) -> Token:
        body = await self._json_body(request, tm=False)
        raw = body.get("timeout")
        # The timeout may come as a number or a numeric string (f5-automation-labs sends "36000").
        if isinstance(raw, bool) or not (isinstance(raw, int) or (isinstance(raw, str) and raw.isdigit())):
            raise _rest_fail(request, 400, f"invalid timeout value {raw!r}")  # the lab's wording
        try:
            return self.tokens.set_timeout(token, int(raw))
        except TokenError as e:
            raise _rest_fail(request, e.status, e.message) from None

    async def unregistered(self, request: web.Request) -> web.Response:
        self.authenticate(request)
        path = request.path.removeprefix("/mgmt")
        raise _rest_fail(request, 404, facts.UNREGISTERED_MESSAGE.format(path=path))

    # ------------------------------------------------------------------ LTM lookups

    def _pool(self, segment: str) -> PoolSpec:
        partition, name = _split(segment)
        pool = self.cfg.pools.get(name) if partition == facts.PARTITION else None
        if pool is None:
            raise _tm_fail(404, facts.pool_not_found(name, partition), facts.NOT_FOUND_API_ERROR)
        return pool

    def _member(self, request: web.Request) -> tuple[PoolSpec, MemberSpec]:
        pool_partition, pool_name = _split(request.match_info["pool"])
        partition, name = _split(request.match_info["member"])
        node, _, port = name.rpartition(":")
        pool = self.cfg.pools.get(pool_name) if pool_partition == facts.PARTITION else None
        member = pool.members.get(name) if pool is not None and partition == facts.PARTITION else None
        if pool is None or member is None:
            message = facts.member_not_found(pool_name, node or name, port, partition)
            raise _tm_fail(404, message, facts.NOT_FOUND_API_ERROR)
        return pool, member

    async def _views(self, pool: PoolSpec) -> dict[str, runtime.ServerView]:
        try:
            return await runtime.servers(self.socket, pool.backend)
        except runtime.RuntimeError_ as e:
            log.warning("%s", e)
            raise _tm_fail(500, facts.MCPD_LOST_MESSAGE, facts.MCPD_LOST_API_ERROR) from None

    async def _view(self, pool: PoolSpec, member: MemberSpec) -> runtime.ServerView:
        view = (await self._views(pool)).get(member.server)
        if view is None:  # detached from HAProxy at run time: no such member now
            message = facts.member_not_found(pool.name, member.node, str(member.port))
            raise _tm_fail(404, message, facts.NOT_FOUND_API_ERROR)
        return view

    async def _patch_body(self, request: web.Request, allowed: set[str]) -> dict[str, Any]:
        body = {k: v for k, v in (await self._json_body(request, tm=True)).items() if k not in READ_ONLY}
        if not body:
            raise _tm_fail(400, facts.NO_PROPERTIES_MESSAGE, facts.BAD_REQUEST_API_ERROR)
        unknown = sorted(set(body) - allowed)
        if unknown:  # real BIG-IP properties the lab does not model: said plainly (lab wording)
            message = f"the lab's BIG-IP stand-in does not support changing {', '.join(unknown)}"
            raise _tm_fail(400, message, facts.BAD_REQUEST_API_ERROR)
        return body

    @staticmethod
    def _check_value(body: dict[str, Any], key: str, values: tuple[str, ...]) -> str | None:
        value = body.get(key)
        if value is not None and value not in values:
            # The lab's wording (f5-common-python rejects these values client-side).
            message = f'invalid property value "{key}":{json.dumps(value)}; accepted: {", ".join(values)}'
            raise _tm_fail(400, message, facts.BAD_REQUEST_API_ERROR)
        return None if value is None else str(value)

    # ------------------------------------------------------------------ LTM handlers

    async def pool(self, request: web.Request) -> web.Response:
        self.authenticate(request)
        pool = self._pool(request.match_info["pool"])
        link = ltm.pool_link(pool.name)
        if request.method == "PATCH":
            body = await self._patch_body(request, {"serviceDownAction"})
            action = self._check_value(body, "serviceDownAction", ltm.SERVICE_DOWN_ACTIONS)
            if action is not None:
                self._store_pool_setting(pool, "serviceDownAction", action)
            self._bump(link)
        elif request.method != "GET":
            raise _rest_fail(request, 405, f"{request.method} is not supported on {request.path}")
        action = self._pool_setting(pool, "serviceDownAction", ltm.DEFAULT_SERVICE_DOWN_ACTION)
        return _json(200, ltm.pool_body(pool, action, self._generation(link)))

    # The settings are read from their file each time: lab/f5/lab.py reset removes it under us.
    def _pool_setting(self, pool: PoolSpec, key: str, default: str) -> str:
        return config.load_pool_settings(self.state_dir).get(pool.name, {}).get(key, default)

    def _store_pool_setting(self, pool: PoolSpec, key: str, value: str) -> None:
        settings = config.load_pool_settings(self.state_dir)
        settings.setdefault(pool.name, {})[key] = value
        config.save_pool_settings(self.state_dir, settings)

    async def members(self, request: web.Request) -> web.Response:
        self.authenticate(request)
        pool = self._pool(request.match_info["pool"])
        views = await self._views(pool)
        items = [
            ltm.member_body(pool, m, views[m.server], self._generation(ltm.member_link(pool.name, m.name)))
            for m in pool.members.values()
            if m.server in views
        ]
        return _json(200, ltm.members_body(pool, items))

    async def members_stats(self, request: web.Request) -> web.Response:
        self.authenticate(request)
        pool = self._pool(request.match_info["pool"])
        return _json(200, ltm.members_stats_body(pool, await self._views(pool)))

    async def member(self, request: web.Request) -> web.Response:
        self.authenticate(request)
        pool, member = self._member(request)
        link = ltm.member_link(pool.name, member.name)
        view = await self._view(pool, member)
        if request.method == "PATCH":
            view = await self._patch_member(request, pool, member, view)
            self._bump(link)
        elif request.method != "GET":
            raise _rest_fail(request, 405, f"{request.method} is not supported on {request.path}")
        return _json(200, ltm.member_body(pool, member, view, self._generation(link)))

    async def _patch_member(
        self, request: web.Request, pool: PoolSpec, member: MemberSpec, view: runtime.ServerView
    ) -> runtime.ServerView:
        body = await self._patch_body(request, {"session", "state"})
        session = self._check_value(body, "session", ltm.SESSION_VALUES)
        state = self._check_value(body, "state", ltm.STATE_VALUES)
        admin = ltm.target_admin(view.admin, session, state)
        if admin == view.admin:
            return view
        try:
            await runtime.set_admin(self.socket, pool.backend, member.server, admin)
        except runtime.RuntimeError_ as e:
            log.warning("%s", e)
            raise _tm_fail(500, facts.MCPD_LOST_MESSAGE, facts.MCPD_LOST_API_ERROR) from None
        log.info(
            "%s/%s (%s/%s): %s -> %s", pool.name, member.name, pool.backend, member.server, view.admin, admin
        )
        return await self._view(pool, member)

    async def member_stats(self, request: web.Request) -> web.Response:
        self.authenticate(request)
        pool, member = self._member(request)
        view = await self._view(pool, member)
        generation = self._generation(ltm.member_link(pool.name, member.name))
        return _json(200, ltm.member_stats_body(pool, member, view, generation))


def ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx
