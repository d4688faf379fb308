"""labapp: the lab's application, shipped inside both release packages (lab/packages.py).

Run as ``python app.py`` from inside a node's app folder. Everything it knows comes from
files next to it, exactly like a customer's application:

* ``release.json``      version and schema_version of this release (the only version source,
                        so one source file serves every release)
* ``web.config``        ``key = value``: http.port, node.name, db.pool_size, greeting, ...
* ``database.config``   ``key = value``: host, port, database, user, password
* ``encryption.config`` ``key = <hex>``: the site-wide key secrets are encrypted with. A node
                        with another key (or none) cannot read the secrets and says so
                        ("encryption key mismatch") in /health: that is what losing a
                        protected file looks like.
* ``admin.config``      ``token_sha256 = <hex>``: the admin interface's token (hashed; per
                        site, never in a package). Read on every admin request.

Endpoints: GET /health, GET /version, POST /login, GET|POST /items, GET /slow?ms=N,
GET|POST /secrets, GET /secrets/{name}, GET / (static/index.html), /static/*.
Every response carries ``X-Node: <node.name>``. SIGTERM stops accepting connections and
lets in-flight requests finish (up to ``shutdown.timeout_s``, default 30 s), then exits 0.

Secret Server's upgrade behaviour, driven by table tbUpgradeSettings (the site row
``Scope = '*'``, and a row per node, ``Scope = node.name``, whose non-NULL values override
the site's; read with a cache of at most SETTINGS_TTL_S):

* maintenance mode: reads are served, changes (POST /items, POST /secrets) are refused with
  423 and ``X-Refused: maintenance``;
* version mismatch: with the site's EnforceVersionMatch on and this code's schema differing
  from the database's, every request but /health, /version and /admin/* gets the mismatch
  page (409, ``X-Refused: version-mismatch``) - unless ignore-version-mismatch AND
  maintenance mode are both in effect on this node ("Allow version mismatch while in
  Maintenance Mode"). /health stays 200 (the site does load) and says so.

Enforcement defaults to off: rolling-deploy runs v1 code on schema 2 by design.

Admin interface (``Authorization: Bearer <token>``, 401 otherwise): GET /admin/state,
POST /admin/settings, GET|POST /admin/audit (tbAudit, type ManualUpgrade, idempotent by
reference).

Fault injection: if ``../inject/fail_health_version`` (outside the app folder, so a deploy
never ships or removes it) holds this release's version, /health answers 500.

Health-check file: while ``../health_check.html`` (in the node's folder, outside the app
folder like ``inject/``) is absent, /health answers 404 "health check file missing": the
load balancer's ``http-check disable-on-404`` then sends the node no new sessions while
its open ones finish (RightScale's drain, seed 003 step 12). Checked on every request.

Only the standard library, aiohttp and aiomysql are used.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomysql
from aiohttp import web

HERE = Path(__file__).resolve().parent
INJECT_FILE = HERE.parent / "inject" / "fail_health_version"
HEALTH_FILE = HERE.parent / "health_check.html"
ADMIN_CONFIG = HERE / "admin.config"

# Both releases run on schema 1 and 2: the v2 migration only adds a nullable column.
MIN_SCHEMA = 1
MAX_SCHEMA = 2
CANARY = "zerodown.canary"
SCHEMA_TTL_S = 2.0
MAX_SLOW_MS = 30000
# Settings are re-read at most this old, so a change made on one node (or in the DB) is in
# effect on every node within half a second; /admin/state always reads them fresh.
SETTINGS_TTL_S = 0.5
# After a failed settings read (DB down) requests use the last known values for this long
# instead of each waiting for the database again.
SETTINGS_RETRY_S = 1.0
SITE_SCOPE = "*"
ADMIN = "/admin"
# What maintenance mode refuses: the changes this application offers (reads still work,
# like Secret Server's read-only vaulting).
CHANGES = {("POST", "/items"), ("POST", "/secrets")}
MAINTENANCE_ERROR = "maintenance mode: changes are refused, reads are served"
AUDIT_TYPE = "ManualUpgrade"
AUDIT_ACTIONS = (
    "STARTED",
    "VERIFY DELTAS",
    "GENERATE UPGRADE ZIP",
    "GENERATE DB SCRIPT",
    "STAGING TEST",
    "COMPLETED",
    "CANCEL",
)
AUDIT_LIMITS = {"notes": 1000, "user": 64, "reference": 190}
# JSON key -> tbUpgradeSettings column (fixed names: never built from request data).
SETTING_COLUMNS = {
    "maintenance_mode": "MaintenanceMode",
    "ignore_version_mismatch": "IgnoreVersionMismatch",
    "enforce_version_match": "EnforceVersionMatch",
}

log = logging.getLogger("labapp")


# --------------------------------------------------------------------------- config files


def read_kv(path: Path) -> dict[str, str]:
    """Parse a ``key = value`` file (``#`` comments, blank lines ignored), or a .NET-style XML
    config (the Secret Server profile's web.config): its ``<appSettings>`` entries."""
    out: dict[str, str] = {}
    text = path.read_text(encoding="utf-8")
    if text.lstrip("\ufeff \t\r\n").startswith("<"):
        import xml.etree.ElementTree as ET

        root = ET.fromstring(text.lstrip("\ufeff"))
        return {e.get("key", ""): e.get("value", "") for e in root.findall("./appSettings/add")}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


def read_kv_optional(path: Path) -> dict[str, str] | None:
    try:
        return read_kv(path)
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- encryption
# A stdlib-only authenticated stream cipher: keystream = sha256(key | nonce | counter),
# tag = HMAC-sha256(key, nonce | ciphertext). Good enough to show that a node with a
# different key cannot read the secrets; not meant as production cryptography.


def _keystream(key: bytes, nonce: bytes, n: int) -> bytes:
    blocks = []
    for counter in range((n + 31) // 32):
        blocks.append(hashlib.sha256(key + nonce + counter.to_bytes(8, "big")).digest())
    return b"".join(blocks)[:n]


def encrypt(key: bytes, plaintext: str) -> str:
    data = plaintext.encode("utf-8")
    nonce = secrets.token_bytes(16)
    ct = bytes(a ^ b for a, b in zip(data, _keystream(key, nonce, len(data)), strict=True))
    tag = hmac.new(key, nonce + ct, hashlib.sha256).digest()[:16]
    return base64.b64encode(nonce + tag + ct).decode("ascii")


class KeyMismatch(Exception):
    pass


KEY_MISMATCH = "encryption key mismatch"


def decrypt(key: bytes, token: str | bytes) -> str:
    raw = base64.b64decode(token if isinstance(token, bytes) else token.encode("ascii"))
    nonce, tag, ct = raw[:16], raw[16:32], raw[32:]
    want = hmac.new(key, nonce + ct, hashlib.sha256).digest()[:16]
    if not hmac.compare_digest(tag, want):
        raise KeyMismatch("secret was encrypted with a different key (encryption.config differs)")
    return bytes(a ^ b for a, b in zip(ct, _keystream(key, nonce, len(ct)), strict=True)).decode("utf-8")


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """The site row and this node's override row of tbUpgradeSettings."""

    site_maintenance: bool = False
    site_ignore: bool = False
    site_enforce: bool = False
    node_maintenance: bool | None = None
    node_ignore: bool | None = None
    node_row: bool = False

    @property
    def maintenance(self) -> bool:
        return self.site_maintenance if self.node_maintenance is None else self.node_maintenance

    @property
    def ignore(self) -> bool:
        return self.site_ignore if self.node_ignore is None else self.node_ignore

    def mismatch_page(self, mismatch: bool) -> bool:
        # Seed: "Allow version mismatch while in Maintenance Mode" - ignoring the mismatch
        # only applies in maintenance mode.
        return mismatch and self.site_enforce and not (self.maintenance and self.ignore)


def _flag(v: Any) -> bool | None:
    return None if v is None else bool(v)


# --------------------------------------------------------------------------- state


class State:
    def __init__(self) -> None:
        self.release: dict[str, Any] = json.loads((HERE / "release.json").read_text(encoding="utf-8"))
        self.version: str = str(self.release["version"])
        self.code_schema: int = int(self.release.get("schema_version", 1))
        self.web: dict[str, str] = read_kv(HERE / "web.config")
        self.node: str = self.web.get("node.name", "unnamed")
        self.db_conf: dict[str, str] | None = read_kv_optional(HERE / "database.config")
        enc = read_kv_optional(HERE / "encryption.config")
        self.key: bytes | None = bytes.fromhex(enc["key"]) if enc and enc.get("key") else None
        self.pool: aiomysql.Pool | None = None
        self.pool_lock = asyncio.Lock()
        self._schema: int | None = None
        self._schema_at = 0.0
        self.key_verified = False  # cached once the canary decrypted: the key cannot change
        self._settings: Settings | None = None
        self._settings_at = 0.0
        self._settings_failed_at: float | None = None
        self._settings_lock = asyncio.Lock()

    @property
    def notes_feature(self) -> bool:
        # v2 code (schema_version >= 2 in release.json) with the feature switch on.
        return self.code_schema >= 2 and self.web.get("feature.notes", "on").lower() in ("on", "true", "1")

    async def get_pool(self) -> aiomysql.Pool:
        # Created lazily so the app starts (and reports 503) while the DB is down.
        async with self.pool_lock:
            if self.pool is None:
                if self.db_conf is None:
                    raise RuntimeError("database.config is missing")
                c = self.db_conf
                size = max(1, min(4, int(self.web.get("db.pool_size", "4"))))
                self.pool = await aiomysql.create_pool(
                    host=c.get("host", "127.0.0.1"),
                    port=int(c.get("port", "3306")),
                    db=c.get("database", "labapp"),
                    user=c.get("user", "zerodown"),
                    password=c.get("password", ""),
                    minsize=1,
                    maxsize=size,
                    autocommit=True,
                    connect_timeout=3,
                    pool_recycle=60,
                )
            return self.pool

    async def query(self, sql: str, args: Any = None, *, write: bool = False) -> list[tuple[Any, ...]]:
        """Run one statement; a dropped connection (DB restart, failover) is retried once."""
        for attempt in (1, 2):
            pool = await self.get_pool()
            try:
                async with pool.acquire() as conn, conn.cursor() as cur:
                    try:
                        await asyncio.wait_for(cur.execute(sql, args), 5)
                    except TimeoutError:
                        # A statement cut mid-protocol leaves the connection unusable:
                        # close it so the pool drops it instead of handing it out again.
                        conn.close()
                        raise
                    return list(await cur.fetchall()) if not write else [(cur.lastrowid,)]
            except aiomysql.OperationalError as e:
                # 2003 can't connect, 2006 gone away, 2013 lost connection: retry once on a
                # fresh connection; anything else (or the second failure) is the answer.
                if attempt == 2 or e.args[0] not in (2003, 2006, 2013):
                    raise
        raise AssertionError("unreachable")

    async def db_schema(self, fresh: bool = False) -> int:
        now = time.monotonic()
        if fresh or self._schema is None or now - self._schema_at > SCHEMA_TTL_S:
            rows = await self.query("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            self._schema, self._schema_at = int(rows[0][0]), now
        return self._schema

    async def settings(self, fresh: bool = False) -> Settings:
        """tbUpgradeSettings as this node sees it, at most SETTINGS_TTL_S old (fresh: read now,
        errors raised). When the database cannot be read, requests that are not fresh go on
        with the last known settings (defaults before any): the DB being down must not add
        a wait to requests that do not need it (/slow)."""
        now = time.monotonic()
        if not fresh:
            if self._settings is not None and now - self._settings_at <= SETTINGS_TTL_S:
                return self._settings
            failed = self._settings_failed_at
            if failed is not None and (now - failed <= SETTINGS_RETRY_S or self._settings_lock.locked()):
                return self._settings or Settings()
        async with self._settings_lock:
            if (
                not fresh
                and self._settings is not None
                and time.monotonic() - self._settings_at <= SETTINGS_TTL_S
            ):
                return self._settings  # refreshed while this request waited for the lock
            try:
                rows = await self.query(
                    "SELECT Scope, MaintenanceMode, IgnoreVersionMismatch, EnforceVersionMatch "
                    "FROM tbUpgradeSettings WHERE Scope IN (%s, %s)",
                    (SITE_SCOPE, self.node),
                )
            except aiomysql.ProgrammingError as e:
                if e.args[0] != 1146:  # 1146: no such table (a database from before the settings)
                    raise
                rows = []
            except Exception as e:
                if fresh:
                    raise
                self._settings_failed_at = time.monotonic()
                log.warning(
                    "cannot read tbUpgradeSettings (%s: %s): using the last known settings",
                    type(e).__name__,
                    e,
                )
                return self._settings or Settings()
            site = next((r for r in rows if r[0] == SITE_SCOPE), None)
            node = next((r for r in rows if r[0] != SITE_SCOPE), None)
            value = Settings(
                site_maintenance=bool(site and site[1]),
                site_ignore=bool(site and site[2]),
                site_enforce=bool(site and site[3]),
                node_maintenance=_flag(node[1]) if node else None,
                node_ignore=_flag(node[2]) if node else None,
                node_row=node is not None,
            )
            self._settings, self._settings_at, self._settings_failed_at = value, time.monotonic(), None
            return value

    def mismatch_text(self, db_schema: int) -> str:
        return (
            f"Version mismatch: this node runs {self.version} (schema {self.code_schema}); "
            f"the database is at schema {db_schema}"
        )

    async def check_key(self) -> str | None:
        """None when the key reads the site's canary secret (written by the first node)."""
        if self.key is None:
            return "encryption.config is missing or has no key: secrets cannot be read"
        if self.key_verified:
            return None
        rows = await self.query(
            "SELECT ciphertext FROM secrets WHERE name = %s ORDER BY id LIMIT 1", (CANARY,)
        )
        if not rows:
            await self.query(
                "INSERT INTO secrets (name, ciphertext) VALUES (%s, %s)",
                (CANARY, encrypt(self.key, "canary")),
                write=True,
            )
            self.key_verified = True
            return None
        try:
            decrypt(self.key, rows[0][0])
        except (KeyMismatch, ValueError) as e:
            return f"{KEY_MISMATCH}: {e}"
        self.key_verified = True
        return None


STATE = web.AppKey("state", State)


def st(request: web.Request) -> State:
    return request.app[STATE]


# --------------------------------------------------------------------------- handlers


async def health(request: web.Request) -> web.Response:
    s = st(request)
    try:
        injected = INJECT_FILE.read_text(encoding="utf-8").strip()
    except OSError:
        injected = ""
    if injected and injected == s.version:
        return web.Response(status=500, text="injected failure")
    if not HEALTH_FILE.is_file():
        # Before the database checks: a node being drained stays drained (404) even while
        # the database is away, instead of flapping to DOWN and back.
        return web.Response(status=404, text="health check file missing")
    try:
        schema = await s.db_schema(fresh=True)
        key_problem = await s.check_key()
    except Exception as e:
        return web.Response(status=503, text=f"database unavailable: {type(e).__name__}: {e}")
    if schema < MIN_SCHEMA:
        return web.Response(status=503, text=f"schema {schema} older than supported ({MIN_SCHEMA})")
    if schema > MAX_SCHEMA:
        return web.Response(status=503, text=f"schema {schema} newer than supported ({MAX_SCHEMA})")
    if key_problem:
        return web.Response(status=503, text=key_problem)
    settings = await s.settings()
    if settings.site_enforce and schema != s.code_schema:
        # Still 200: the site does load (seed step 14), it just shows the mismatch page.
        return web.Response(text=f"ok ({s.mismatch_text(schema).replace('Version', 'version', 1)})")
    return web.Response(text="ok")


async def version(request: web.Request) -> web.Response:
    s = st(request)
    try:
        db_schema: int | None = await asyncio.wait_for(s.db_schema(), 3)
    except Exception:
        db_schema = None
    try:
        settings: Settings | None = await asyncio.wait_for(s.settings(), 3)
    except Exception:
        settings = None
    # "schema" is the schema this release targets (release.json); "db_schema" what the DB holds.
    # "mismatch": the two differ; "mismatch_page": this node serves the mismatch page for it.
    mismatch = db_schema is not None and db_schema != s.code_schema
    return web.json_response(
        {
            "version": s.version,
            "node": s.node,
            "schema": s.code_schema,
            "db_schema": db_schema,
            "greeting": s.web.get("greeting", ""),
            "config": s.web,
            "mismatch": mismatch,
            "mismatch_page": settings.mismatch_page(mismatch) if settings else None,
            "maintenance_mode": settings.maintenance if settings else None,
            "ignore_version_mismatch": settings.ignore if settings else None,
        }
    )


async def _fields(request: web.Request) -> dict[str, str]:
    if request.content_type == "application/json":
        try:
            data = await request.json()
        except ValueError as e:
            raise web.HTTPBadRequest(text="invalid JSON") from e
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="expected a JSON object")
        return {str(k): str(v) for k, v in data.items() if v is not None}
    form = await request.post()
    return {k: v for k, v in form.items() if isinstance(v, str)}


async def login(request: web.Request) -> web.Response:
    f = await _fields(request)
    user, password = f.get("user", ""), f.get("password", "")
    rows = await st(request).query("SELECT password_sha256 FROM users WHERE name = %s", (user,))
    digest = hashlib.sha256(password.encode("utf-8")).hexdigest()
    if rows and hmac.compare_digest(str(rows[0][0]).lower(), digest):
        return web.json_response({"user": user, "ok": True})
    return web.json_response({"ok": False, "error": "invalid user or password"}, status=401)


def _row(cols: list[str], r: tuple[Any, ...]) -> dict[str, Any]:
    return {
        c: (v.isoformat() if isinstance(v, (dt.datetime, dt.date)) else v)
        for c, v in zip(cols, r, strict=True)
    }


async def items_get(request: web.Request) -> web.Response:
    s = st(request)
    cols = ["id", "node", "body", "created_at"]
    if s.notes_feature and await s.db_schema() >= 2:
        cols.append("notes")
    try:
        rows = await s.query(f"SELECT {', '.join(cols)} FROM items ORDER BY id DESC LIMIT 10")
    except aiomysql.OperationalError as e:
        if e.args[0] != 1054 or "notes" not in cols:  # 1054: unknown column (rolled back)
            raise
        cols.remove("notes")
        rows = await s.query(f"SELECT {', '.join(cols)} FROM items ORDER BY id DESC LIMIT 10")
    return web.json_response([_row(cols, r) for r in rows])


async def items_post(request: web.Request) -> web.Response:
    s = st(request)
    if request.content_type in (
        "application/json",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        body = (await _fields(request)).get("body", "")
    else:
        body = await request.text()
    body = body[:255]  # items.body is VARCHAR(255)
    if s.notes_feature and await s.db_schema() >= 2:
        try:
            rows = await s.query(
                "INSERT INTO items (node, body, notes) VALUES (%s, %s, %s)",
                (s.node, body, f"written by {s.version}"),
                write=True,
            )
            return web.json_response({"id": rows[0][0], "node": s.node, "notes": True}, status=201)
        except aiomysql.OperationalError as e:
            if e.args[0] != 1054:  # the column went away (down migration): write without it
                raise
            await s.db_schema(fresh=True)
    rows = await s.query("INSERT INTO items (node, body) VALUES (%s, %s)", (s.node, body), write=True)
    return web.json_response({"id": rows[0][0], "node": s.node, "notes": False}, status=201)


async def slow(request: web.Request) -> web.Response:
    try:
        ms = int(request.query.get("ms", "1000"))
    except ValueError as e:
        raise web.HTTPBadRequest(text="ms must be an integer") from e
    ms = max(0, min(MAX_SLOW_MS, ms))
    await asyncio.sleep(ms / 1000)
    return web.Response(text=f"slept {ms} ms\n")


async def secrets_put(request: web.Request) -> web.Response:
    s = st(request)
    f = await _fields(request)
    name, value = f.get("name", ""), f.get("value", "")
    if not name or s.key is None:
        return web.json_response({"error": "need a name and an encryption key"}, status=400)
    await s.query("DELETE FROM secrets WHERE name = %s", (name,), write=True)
    await s.query(
        "INSERT INTO secrets (name, ciphertext) VALUES (%s, %s)", (name, encrypt(s.key, value)), write=True
    )
    return web.json_response({"name": name}, status=201)


async def secrets_get(request: web.Request) -> web.Response:
    s = st(request)
    name = request.match_info["name"]
    rows = await s.query("SELECT ciphertext FROM secrets WHERE name = %s ORDER BY id DESC LIMIT 1", (name,))
    if not rows:
        return web.json_response({"error": f"no secret {name!r}"}, status=404)
    if s.key is None:
        return web.json_response({"error": "encryption.config is missing: cannot read secrets"}, status=409)
    try:
        value = decrypt(s.key, rows[0][0])
    except (KeyMismatch, ValueError) as e:
        return web.json_response({"error": f"cannot read secret {name!r}: {KEY_MISMATCH}: {e}"}, status=409)
    return web.json_response({"name": name, "value": value})


async def secrets_list(request: web.Request) -> web.Response:
    rows = await st(request).query("SELECT name FROM secrets ORDER BY id")
    return web.json_response([r[0] for r in rows])


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(HERE / "static" / "index.html")


# --------------------------------------------------------------------------- admin interface


def _admin_error(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return web.json_response({"error": message}, status=status, headers=headers)


def _admin_refusal(request: web.Request) -> web.Response | None:
    """None when the request carries the token admin.config holds the sha256 of."""
    try:
        conf = read_kv(ADMIN_CONFIG)
    except OSError:
        return _admin_error(401, "admin interface disabled: admin.config is missing")
    want = conf.get("token_sha256", "").strip().lower()
    if len(want) != 64:
        return _admin_error(401, "admin interface disabled: admin.config has no token_sha256")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    got = hashlib.sha256(token.strip().encode("utf-8")).hexdigest()
    # Digests of equal length, compared in constant time: no timing hint about the token.
    if scheme.lower() != "bearer" or not token.strip() or not hmac.compare_digest(got, want):
        return _admin_error(401, "missing or wrong admin token")
    return None


def admin_only(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        refusal = _admin_refusal(request)
        return refusal if refusal is not None else await handler(request)

    return wrapped


async def _json_object(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError as e:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "invalid JSON"}), content_type="application/json"
        ) from e
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "expected a JSON object"}), content_type="application/json"
        )
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"unknown keys {unknown} (allowed: {sorted(allowed)})"}),
            content_type="application/json",
        )
    return data


async def admin_state_data(s: State) -> dict[str, Any]:
    settings = await s.settings(fresh=True)
    db_schema = await s.db_schema(fresh=True)
    mismatch = db_schema != s.code_schema
    return {
        "node": s.node,
        "version": s.version,
        "code_schema": s.code_schema,
        "db_schema": db_schema,
        "maintenance_mode": settings.maintenance,
        "ignore_version_mismatch": settings.ignore,
        "enforce_version_match": settings.site_enforce,
        "mismatch": mismatch,
        "mismatch_page": settings.mismatch_page(mismatch),
        "site": {
            "maintenance_mode": settings.site_maintenance,
            "ignore_version_mismatch": settings.site_ignore,
            "enforce_version_match": settings.site_enforce,
        },
        "node_override": {
            "maintenance_mode": settings.node_maintenance,
            "ignore_version_mismatch": settings.node_ignore,
        }
        if settings.node_row
        else None,
    }


async def admin_state(request: web.Request) -> web.Response:
    return web.json_response(await admin_state_data(st(request)))


async def admin_settings(request: web.Request) -> web.Response:
    """Set (not toggle) settings: absent keys are left as they are; for scope node, null
    clears that override, and a node row left with nothing set is deleted."""
    s = st(request)
    data = await _json_object(request, {"scope", *SETTING_COLUMNS})
    scope = data.get("scope")
    if scope not in ("site", "node"):
        return _admin_error(400, f"scope must be 'site' or 'node', got {scope!r}")
    changes: dict[str, bool | None] = {}
    for key in SETTING_COLUMNS:
        if key not in data:
            continue
        v = data[key]
        if scope == "node" and key == "enforce_version_match":
            return _admin_error(400, "enforce_version_match is a site setting (scope 'site')")
        if not isinstance(v, bool) and not (v is None and scope == "node"):
            allowed = "true, false or null" if scope == "node" else "true or false"
            return _admin_error(400, f"{key} must be {allowed}, got {v!r}")
        changes[key] = v
    if scope == "site":
        await s.query(
            "INSERT INTO tbUpgradeSettings (Scope, MaintenanceMode, IgnoreVersionMismatch, "
            "EnforceVersionMatch) VALUES (%s, 0, 0, 0) ON DUPLICATE KEY UPDATE Scope = Scope",
            (SITE_SCOPE,),
            write=True,
        )
        for key, v in changes.items():
            await s.query(
                f"UPDATE tbUpgradeSettings SET {SETTING_COLUMNS[key]} = %s WHERE Scope = %s",
                (int(bool(v)), SITE_SCOPE),
                write=True,
            )
    else:
        for key, v in changes.items():
            col = SETTING_COLUMNS[key]
            await s.query(
                f"INSERT INTO tbUpgradeSettings (Scope, {col}) VALUES (%s, %s) "
                f"ON DUPLICATE KEY UPDATE {col} = VALUES({col})",
                (s.node, None if v is None else int(v)),
                write=True,
            )
        await s.query(
            "DELETE FROM tbUpgradeSettings WHERE Scope = %s AND MaintenanceMode IS NULL "
            "AND IgnoreVersionMismatch IS NULL AND EnforceVersionMatch IS NULL",
            (s.node,),
            write=True,
        )
    if changes:
        log.info("admin: %s settings %s", scope, changes)
    return web.json_response(await admin_state_data(s))


_AUDIT_COLS = "AuditId, AuditTypeName, Action, Notes, UserName, Reference, DateRecorded"


def _audit_row(r: tuple[Any, ...], created: bool | None = None) -> dict[str, Any]:
    when = r[6]
    out: dict[str, Any] = {
        "audit_id": int(r[0]),
        "audit_type": r[1],
        "action": r[2],
        "notes": r[3] or "",
        "user": r[4] or "",
        "reference": r[5] or "",
        # Stored as UTC (UTC_TIMESTAMP), so say so.
        "date_recorded": when.isoformat(timespec="milliseconds") + "Z"
        if isinstance(when, dt.datetime)
        else str(when),
    }
    if created is not None:
        out["created"] = created
    return out


async def _audit_by_reference(s: State, reference: str) -> tuple[Any, ...] | None:
    rows = await s.query(f"SELECT {_AUDIT_COLS} FROM tbAudit WHERE Reference = %s", (reference,))
    return rows[0] if rows else None


def _existing_audit(row: tuple[Any, ...], action: str) -> web.Response:
    if row[2] != action:
        return _admin_error(
            409,
            f"reference {row[5]!r} is already used by audit {row[0]} with action {row[2]!r}, not {action!r}",
        )
    return web.json_response(_audit_row(row, created=False), status=200)


async def admin_audit_post(request: web.Request) -> web.Response:
    s = st(request)
    data = await _json_object(request, {"action", "notes", "user", "reference"})
    action = data.get("action")
    if action not in AUDIT_ACTIONS:
        return _admin_error(400, f"action must be one of {', '.join(AUDIT_ACTIONS)}, got {action!r}")
    fields: dict[str, str] = {}
    for key, limit in AUDIT_LIMITS.items():
        v = data.get(key)
        if v is None:
            v = ""
        if not isinstance(v, str) or len(v) > limit:
            return _admin_error(400, f"{key} must be a string of at most {limit} characters")
        fields[key] = v
    ref = fields["reference"]
    if ref:
        row = await _audit_by_reference(s, ref)
        if row is not None:
            return _existing_audit(row, action)
    try:
        rows = await s.query(
            "INSERT INTO tbAudit (AuditTypeName, Action, Notes, UserName, Reference, "
            "DateRecorded) VALUES (%s, %s, %s, %s, %s, UTC_TIMESTAMP(3))",
            (AUDIT_TYPE, action, fields["notes"] or None, fields["user"] or None, ref or None),
            write=True,
        )
    except aiomysql.IntegrityError as e:
        # 1062: the same reference was recorded concurrently (another node, a retry).
        if e.args[0] != 1062 or not ref:
            raise
        row = await _audit_by_reference(s, ref)
        if row is None:
            raise
        return _existing_audit(row, action)
    new = await s.query(f"SELECT {_AUDIT_COLS} FROM tbAudit WHERE AuditId = %s", (rows[0][0],))
    log.info("admin: audit %s %s %s", AUDIT_TYPE, action, ref)
    return web.json_response(_audit_row(new[0], created=True), status=201)


async def admin_audit_get(request: web.Request) -> web.Response:
    rows = await st(request).query(f"SELECT {_AUDIT_COLS} FROM tbAudit ORDER BY AuditId")
    return web.json_response([_audit_row(r) for r in rows])


# --------------------------------------------------------------------------- app wiring

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn DB errors into a 503 with the reason instead of aiohttp's bare 500."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except (TimeoutError, aiomysql.Error, OSError, RuntimeError) as e:
        log.warning("%s %s failed: %s: %s", request.method, request.path, type(e).__name__, e)
        return web.Response(status=503, text=f"database unavailable: {type(e).__name__}: {e}")


def _exempt(path: str) -> bool:
    """Paths the upgrade settings never block: the probes of a load balancer / zerodown
    and the admin interface that changes the settings."""
    return path in ("/health", "/version") or path == ADMIN or path.startswith(ADMIN + "/")


@web.middleware
async def upgrade_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The version mismatch page and maintenance mode (see the module docstring)."""
    if _exempt(request.path):
        return await handler(request)
    s = st(request)
    settings = await s.settings()
    if settings.site_enforce:
        try:
            db_schema: int | None = await s.db_schema()
        except Exception:
            db_schema = None  # unknown: the handler meets the DB error itself
        if db_schema is not None and settings.mismatch_page(db_schema != s.code_schema):
            return web.Response(
                status=409, text=s.mismatch_text(db_schema) + "\n", headers={"X-Refused": "version-mismatch"}
            )
    if (request.method, request.path) in CHANGES and settings.maintenance:
        return web.json_response(
            {"error": MAINTENANCE_ERROR}, status=423, headers={"X-Refused": "maintenance"}
        )
    return await handler(request)


async def _set_node_header(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare also sees aiohttp's own error pages (404, 405, 500).
    response.headers["X-Node"] = request.app[STATE].node


async def _close_pool(app: web.Application) -> None:
    pool = app[STATE].pool
    if pool is not None:
        pool.close()
        await pool.wait_closed()


def make_app(state: State | None = None) -> web.Application:
    app = web.Application(middlewares=[errors, upgrade_gate])
    app[STATE] = state or State()
    app.on_response_prepare.append(_set_node_header)
    app.on_cleanup.append(_close_pool)
    app.add_routes(
        [
            web.get("/", index),
            web.get("/health", health),
            web.get("/version", version),
            web.post("/login", login),
            web.get("/items", items_get),
            web.post("/items", items_post),
            web.get("/slow", slow),
            web.get("/secrets", secrets_list),
            web.post("/secrets", secrets_put),
            web.get("/secrets/{name}", secrets_get),
            web.get(f"{ADMIN}/state", admin_only(admin_state)),
            web.post(f"{ADMIN}/settings", admin_only(admin_settings)),
            web.get(f"{ADMIN}/audit", admin_only(admin_audit_get)),
            web.post(f"{ADMIN}/audit", admin_only(admin_audit_post)),
        ]
    )
    if (HERE / "static").is_dir():
        app.router.add_static("/static/", HERE / "static")
    return app


def main() -> None:
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    state = State()
    port = int(state.web.get("http.port", "8080"))
    host = state.web.get("http.host", "127.0.0.1")
    log.info(
        "labapp %s (schema %s) node=%s pid=%s listening on %s:%s",
        state.version,
        state.code_schema,
        state.node,
        os.getpid(),
        host,
        port,
    )
    access = state.web.get("log.access", "on").lower() in ("on", "true", "1")
    web.run_app(
        make_app(state),
        host=host,
        port=port,
        print=None,
        shutdown_timeout=float(state.web.get("shutdown.timeout_s", "30")),
        access_log=logging.getLogger("aiohttp.access") if access else None,
        access_log_format='%a "%r" %s %b %Tfs',
    )
    log.info("labapp %s node=%s stopped", state.version, state.node)


if __name__ == "__main__":
    main()
