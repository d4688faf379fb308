"""labapp: the lab's application, shipped inside both release packages (lab/packages.py).

Run as ``python app.py`` from inside a node's app folder. Everything it knows comes from
files next to it, exactly like a customer's application:

* ``release.json``      version and schema_version of this release (the only version source,
                        so one source file serves every release)
* ``web.config``        ``key = value``: http.port, node.name, db.pool_size, greeting, ...
* ``database.config``   ``key = value``: host, port, database, user, password
* ``encryption.config`` ``key = <hex>``: the site-wide key secrets are encrypted with. A node
                        with another key (or none) cannot read the secrets and says so in
                        /health: that is what losing a protected file looks like.

Endpoints: GET /health, GET /version, POST /login, GET|POST /items, GET /slow?ms=N,
GET|POST /secrets, GET /secrets/{name}, GET / (static/index.html), /static/*.
Every response carries ``X-Node: <node.name>``. SIGTERM stops accepting connections and
lets in-flight requests finish (up to ``shutdown.timeout_s``, default 30 s), then exits 0.

Fault injection: if ``../inject/fail_health_version`` (outside the app folder, so a deploy
never ships or removes it) holds this release's version, /health answers 500.

Only the standard library, aiohttp and aiomysql are used.
"""

from __future__ import annotations

import asyncio
import base64
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

# Both releases run on schema 1 and 2: the v2 migration only adds a nullable column.
MIN_SCHEMA = 1
MAX_SCHEMA = 2
CANARY = "zerodown.canary"
SCHEMA_TTL_S = 2.0
MAX_SLOW_MS = 30000

log = logging.getLogger("labapp")


# --------------------------------------------------------------------------- config files


def read_kv(path: Path) -> dict[str, str]:
    """Parse a ``key = value`` file (``#`` comments, blank lines ignored)."""
    out: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
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


def decrypt(key: bytes, token: str | bytes) -> str:
    raw = base64.b64decode(token if isinstance(token, bytes) else token.encode("ascii"))
    nonce, tag, ct = raw[:16], raw[16:32], raw[32:]
    want = hmac.new(key, nonce + ct, hashlib.sha256).digest()[:16]
    if not hmac.compare_digest(tag, want):
        raise KeyMismatch("secret was encrypted with a different key (encryption.config differs)")
    return bytes(a ^ b for a, b in zip(ct, _keystream(key, nonce, len(ct)), strict=True)).decode("utf-8")


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
                    host=c.get("host", "127.0.0.1"), port=int(c.get("port", "3306")),
                    db=c.get("database", "labapp"), user=c.get("user", "zerodown"),
                    password=c.get("password", ""), minsize=1, maxsize=size, autocommit=True,
                    connect_timeout=3, pool_recycle=60,
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

    async def check_key(self) -> str | None:
        """None when the key reads the site's canary secret (written by the first node)."""
        if self.key is None:
            return "encryption.config is missing or has no key: secrets cannot be read"
        if self.key_verified:
            return None
        rows = await self.query("SELECT ciphertext FROM secrets WHERE name = %s ORDER BY id LIMIT 1",
                                (CANARY,))
        if not rows:
            await self.query("INSERT INTO secrets (name, ciphertext) VALUES (%s, %s)",
                             (CANARY, encrypt(self.key, "canary")), write=True)
            self.key_verified = True
            return None
        try:
            decrypt(self.key, rows[0][0])
        except (KeyMismatch, ValueError) as e:
            return f"encryption key mismatch: {e}"
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
    return web.Response(text="ok")


async def version(request: web.Request) -> web.Response:
    s = st(request)
    try:
        db_schema: int | None = await asyncio.wait_for(s.db_schema(), 3)
    except Exception:
        db_schema = None
    # "schema" is the schema this release targets (release.json); "db_schema" what the DB holds.
    return web.json_response({"version": s.version, "node": s.node, "schema": s.code_schema,
                              "db_schema": db_schema, "greeting": s.web.get("greeting", ""),
                              "config": s.web})


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
    return {c: (v.isoformat() if isinstance(v, (dt.datetime, dt.date)) else v) for c, v in zip(cols, r,
                                                                                                 strict=True)}


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
    if request.content_type in ("application/json", "application/x-www-form-urlencoded",
                                "multipart/form-data"):
        body = (await _fields(request)).get("body", "")
    else:
        body = await request.text()
    body = body[:255]  # items.body is VARCHAR(255)
    if s.notes_feature and await s.db_schema() >= 2:
        try:
            rows = await s.query("INSERT INTO items (node, body, notes) VALUES (%s, %s, %s)",
                                 (s.node, body, f"written by {s.version}"), write=True)
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
    await s.query("INSERT INTO secrets (name, ciphertext) VALUES (%s, %s)",
                  (name, encrypt(s.key, value)), write=True)
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
        return web.json_response({"error": f"cannot read secret {name!r}: {e}"}, status=409)
    return web.json_response({"name": name, "value": value})


async def secrets_list(request: web.Request) -> web.Response:
    rows = await st(request).query("SELECT name FROM secrets ORDER BY id")
    return web.json_response([r[0] for r in rows])


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(HERE / "static" / "index.html")


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


async def _set_node_header(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare also sees aiohttp's own error pages (404, 405, 500).
    response.headers["X-Node"] = request.app[STATE].node


async def _close_pool(app: web.Application) -> None:
    pool = app[STATE].pool
    if pool is not None:
        pool.close()
        await pool.wait_closed()


def make_app(state: State | None = None) -> web.Application:
    app = web.Application(middlewares=[errors])
    app[STATE] = state or State()
    app.on_response_prepare.append(_set_node_header)
    app.on_cleanup.append(_close_pool)
    app.add_routes([
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
    ])
    if (HERE / "static").is_dir():
        app.router.add_static("/static/", HERE / "static")
    return app


def main() -> None:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = State()
    port = int(state.web.get("http.port", "8080"))
    host = state.web.get("http.host", "127.0.0.1")
    log.info("labapp %s (schema %s) node=%s pid=%s listening on %s:%s", state.version,
             state.code_schema, state.node, os.getpid(), host, port)
    access = state.web.get("log.access", "on").lower() in ("on", "true", "1")
    web.run_app(make_app(state), host=host, port=port, print=None,
                shutdown_timeout=float(state.web.get("shutdown.timeout_s", "30")),
                access_log=logging.getLogger("aiohttp.access") if access else None,
                access_log_format='%a "%r" %s %b %Tfs')
    log.info("labapp %s node=%s stopped", state.version, state.node)


if __name__ == "__main__":
    main()
