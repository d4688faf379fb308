"""An Open-Xchange middleware node of the lab: one small aiohttp process per OX node folder.

It stands in for OX's middleware as far as seed 002 needs it: it serves the contexts whose
server (config DB `context_server2db_pool.server_id`) is the one registered under this node's
`SERVER_NAME`, and sends a user whose context moved to another server to the secondary load
balancer when `com.openexchange.server.migrationRedirectURL` is set (seed, "Q & A").

Read at start, from the node folder (lab/ox/nodes.py lays it out):
    installed/version        the release it runs (an `oxpkg install` only counts after a restart)
    etc/server.properties    migrationRedirectURL     } re-read on SIGHUP (`ctl reload`, OX's
    etc/system.properties    SERVER_NAME              } reloadconfiguration), no restart
    bin/ox-tools.env         how to reach the config DB (the tools' env file: user openexchange)
Serves the admin endpoint (127.0.0.1:--admin-port) where the node's command line tools run
in-process (in threads; lab/ox/admin.py), as OX's tools call its middleware over RMI.
Writes run/ox.reload, "<pid> <generation> ok|error <why>": generation 0 once it is ready for
SIGHUP (before its port opens), +1 per reload, so `ctl reload` can wait for the confirmation.

HTTP API (every response carries `X-Node: oxN`):
    GET /health     200 "ok" when the config DB answers, else 503
    GET /version    {"version", "node", "server_name", "server_id", "migration_redirect_url"}
    GET /ox/login?context=<cid>&user=<uid>
        unknown context            404 {"code": "CTX-0002", ...}
        context disabled           403 {"code": "LGI-0016", ...}, header X-OX-Refused: disabled
        context on this server     200 {"context", "user", "schema", "server", "node", "version"}
        context on another server  302 to <migrationRedirectURL>/ox/login?... (X-OX-Redirect:
                                   migration) when the URL is set, else 409 {"code": "CTX-0012"}
The config DB is read on every request (no cache): a schema moved by changeserver, or
disabled by disableschema, is seen by the next request.

Process: ``python -m lab.ox.middleware --node-dir DIR --name oxN --port P --admin-port A``
(started by ctl).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiomysql
import pymysql
from aiohttp import web

from lab.ox import configdb
from lab.ox.admin import AdminServer
from lab.ox.tools import ENV_FILE_NAME, load_env

REDIRECT_KEY = "com.openexchange.server.migrationRedirectURL"
SERVER_NAME_KEY = "SERVER_NAME"
QUERY_TIMEOUT_S = 5.0
log = logging.getLogger("lab.ox.middleware")


def read_properties(path: Path) -> dict[str, str]:
    """A Java-style properties file: `key=value` or `key: value`, `#`/`!` comments, blank
    lines; values stripped. A missing file is empty (OX starts with its defaults)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    props: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        cut = min((p for p in (line.find("="), line.find(":")) if p >= 0), default=-1)
        key, value = (line, "") if cut < 0 else (line[:cut], line[cut + 1 :])
        props[key.strip()] = value.strip()
    return props


@dataclass(frozen=True)
class Settings:
    server_name: str
    redirect_url: str | None  # None: not set (an empty value counts as not set)


def load_settings(node_dir: Path) -> Settings:
    server = read_properties(node_dir / "etc" / "server.properties")
    system = read_properties(node_dir / "etc" / "system.properties")
    return Settings(
        server_name=system.get(SERVER_NAME_KEY, ""), redirect_url=server.get(REDIRECT_KEY) or None
    )


class Node:
    """One OX node's state: what it read at start / last reload, and its config DB pool."""

    def __init__(self, node_dir: Path, name: str, admin_port: int | None = None) -> None:
        self.dir = node_dir
        self.name = name
        # The release is fixed for the process's life, like a JVM's loaded code.
        self.version = (node_dir / "installed" / "version").read_text(encoding="utf-8").strip()
        self.settings = load_settings(node_dir)
        self.generation = 0
        self._env = load_env({"OX_TOOLS_ENV": str(node_dir / "bin" / ENV_FILE_NAME)})
        self._pool: aiomysql.Pool | None = None
        # Where the node's command line tools run (OX's RMI interface; lab/ox/admin.py).
        # None: started by a node folder's older ctl - no endpoint, the tools fail until
        # `lab reset` rewrites ctl and restarts the node.
        self.admin = AdminServer(node_dir, admin_port) if admin_port is not None else None

    # ------------------------------------------------------------ reload (SIGHUP)

    def _confirm(self, status: str) -> None:
        path = self.dir / "run" / "ox.reload"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{os.getpid()} {self.generation} {status}\n", encoding="utf-8")
        tmp.replace(path)  # atomic: ctl never reads half a line

    def reload(self) -> None:
        """Re-read the properties; keep the old settings when they cannot be read."""
        self.generation += 1
        try:
            self.settings = load_settings(self.dir)
        except (OSError, UnicodeDecodeError) as e:
            log.warning("reload %d failed, settings unchanged: %s", self.generation, e)
            self._confirm(f"error {e}".replace("\n", " "))
            return
        log.info("reload %d: %s", self.generation, self.settings)
        self._confirm("ok")

    # ------------------------------------------------------------ config DB

    def _password(self) -> str:
        password_file = self._env.get("OX_CONFIGDB_PASSWORD_FILE")
        return self._env.get("OX_CONFIGDB_PASSWORD") or (
            Path(password_file).read_text(encoding="utf-8").strip() if password_file else ""
        )

    async def start(self) -> None:
        env = self._env
        # minsize 0: the node starts (and answers /health with 503) while the DB is down; a
        # few connections are plenty for a lab node behind a probe.
        self._pool = await aiomysql.create_pool(
            minsize=0,
            maxsize=4,
            host=env.get("OX_CONFIGDB_HOST", "127.0.0.1"),
            port=int(env.get("OX_CONFIGDB_PORT", "3306")),
            user=env.get("OX_CONFIGDB_USER", configdb.OX_DB_USER),
            password=self._password(),
            db=configdb.CONFIGDB,
            autocommit=True,
            connect_timeout=3,
            pool_recycle=60,
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            await self._pool.wait_closed()

    async def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of one statement. A pooled connection broken by a MariaDB restart fails once
        and is dropped; the retry gets a new one."""
        assert self._pool is not None
        for attempt in (1, 2):
            conn = await self._pool.acquire()
            ok = False
            try:
                async with conn.cursor() as cur:
                    await asyncio.wait_for(cur.execute(sql, args), QUERY_TIMEOUT_S)
                    rows = list(await cur.fetchall())
                ok = True
                return rows
            except (pymysql.err.OperationalError, pymysql.err.InterfaceError, TimeoutError):
                if attempt == 2:
                    raise
            finally:
                if not ok:  # broken or cut mid-query (timeout, cancel): never back into the pool
                    conn.close()
                self._pool.release(conn)
        raise AssertionError("unreachable")

    async def server_id(self) -> int | None:
        rows = await self.query("SELECT server_id FROM server WHERE name = %s", (self.settings.server_name,))
        return int(rows[0][0]) if rows else None


# --------------------------------------------------------------------------- HTTP

NODE: web.AppKey[Node] = web.AppKey("node", Node)
DB_ERRORS = (pymysql.MySQLError, OSError, TimeoutError)


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


async def health(request: web.Request) -> web.Response:
    try:
        # A table of the config DB, not just `SELECT 1`: a pooled connection still answers
        # that after the config DB was dropped.
        await request.app[NODE].query("SELECT COUNT(*) FROM server")
    except DB_ERRORS as e:
        return web.Response(status=503, text=f"config database unreachable: {e}\n")
    return web.Response(text="ok")


async def version(request: web.Request) -> web.Response:
    node = request.app[NODE]
    try:
        sid = await node.server_id()
    except DB_ERRORS:
        sid = None  # still say what runs here: /version is what an operator checks first
    return _json(
        200,
        {
            "version": node.version,
            "node": node.name,
            "server_name": node.settings.server_name,
            "server_id": sid,
            "migration_redirect_url": node.settings.redirect_url,
        },
    )


def _bad_request(code: str, error: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"code": code, "error": error}), content_type="application/json"
    )


def _int_param(request: web.Request, key: str, required: bool) -> int | None:
    raw = request.query.get(key)
    if raw is None or raw == "":
        if required:
            raise _bad_request("SVL-0002", f"Missing parameter {key}")
        return None
    if not raw.isdigit():
        raise _bad_request("SVL-0010", f"Invalid parameter {key}")
    return int(raw)


async def login(request: web.Request) -> web.Response:
    """OX's context resolution at login (seed, "Q & A")."""
    node = request.app[NODE]
    cid = _int_param(request, "context", required=True)
    uid = _int_param(request, "user", required=False)
    settings = node.settings  # one snapshot: a reload mid-request does not mix two
    try:
        rows = await node.query(
            "SELECT c.enabled, m.server_id, m.db_schema, "
            "(SELECT s.server_id FROM server s WHERE s.name = %s) FROM context c "
            "JOIN context_server2db_pool m ON m.cid = c.cid WHERE c.cid = %s LIMIT 1",
            (settings.server_name, cid),
        )
    except DB_ERRORS as e:
        return _json(503, {"code": "DBP-0001", "error": f"Cannot get a connection to the config DB: {e}"})
    if not rows:
        return _json(404, {"code": "CTX-0002", "error": f"Context {cid} does not exist"})
    enabled, context_server, schema, own_server = rows[0]
    # Disabled first: during a schema's upgrade its contexts are refused everywhere, on the
    # old and the new server alike (expected unavailability, counted apart by the probe).
    if not enabled:
        return _json(
            403,
            {"code": "LGI-0016", "error": f"Context {cid} is disabled"},
            headers={"X-OX-Refused": "disabled"},
        )
    if own_server is not None and int(context_server) == int(own_server):
        return _json(
            200,
            {
                "context": cid,
                "user": uid,
                "schema": schema,
                "server": settings.server_name,
                "node": node.name,
                "version": node.version,
            },
        )
    if settings.redirect_url:
        query = {"context": cid, **({"user": uid} if uid is not None else {})}
        location = f"{settings.redirect_url.rstrip('/')}/ox/login?{urlencode(query)}"
        return _json(
            302, {"redirect": location}, headers={"Location": location, "X-OX-Redirect": "migration"}
        )
    # No redirect without the property: on the upgraded cluster it would loop (seed, Q & A).
    return _json(
        409,
        {
            "code": "CTX-0012",
            "error": f"The context {cid} is located in server with id {int(context_server)}",
        },
    )


def make_app(node: Node) -> web.Application:
    app = web.Application()
    app[NODE] = node

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Node"] = node.name

    async def on_startup(app: web.Application) -> None:
        await node.start()
        if node.admin is not None:
            await node.admin.start()
        else:
            log.warning("no --admin-port: this node's command line tools cannot run (lab reset fixes it)")
        # Before the port opens (run_app binds after startup): ctl start returning means a
        # SIGHUP is safe, and run/ox.reload says so to ctl reload.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, node.reload)
        node._confirm("ok")

    async def on_cleanup(app: web.Application) -> None:
        if node.admin is not None:
            await node.admin.close()
        await node.close()

    app.on_response_prepare.append(on_prepare)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    handlers: list[tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("/health", health),
        ("/version", version),
        ("/ox/login", login),
    ]
    for path, handler in handlers:
        app.router.add_get(path, handler)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lab.ox.middleware", description=__doc__.splitlines()[0])
    p.add_argument("--node-dir", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--admin-port", type=int, default=None, help="the tools' endpoint (127.0.0.1)")
    a = p.parse_args(argv)
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    node = Node(a.node_dir.resolve(), a.name, a.admin_port)
    log.info(
        "open-xchange %s node=%s server_name=%s starting on port %d",
        node.version,
        node.name,
        node.settings.server_name,
        a.port,
    )
    gc.freeze()  # what is loaded now lives as long as the process: out of the collector's passes
    # No access log: a probe at 100 requests/s would fill run/ox.log. Requests are short, so
    # a short graceful shutdown lets the in-flight ones finish.
    web.run_app(
        make_app(node), host="127.0.0.1", port=a.port, print=None, access_log=None, shutdown_timeout=10
    )
    log.info("open-xchange %s node=%s stopped", node.version, node.name)


if __name__ == "__main__":
    main()
