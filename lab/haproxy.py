"""The lab's HAProxy: two frontends over the app nodes, driven through the runtime API.

* frontend `main` (cfg.main_port) -> backend `app`: every node, health-checked, in rotation.
* frontend `secondary` (cfg.secondary_port) -> backend `app_secondary`: the same servers,
  all in maintenance, so a procedure can move nodes between the two (blue/green style) with
  `set server ... state ready|maint` alone, without a reload. They are put in maintenance
  through the runtime API right after HAProxy starts, not with the `disabled` keyword: that
  one is a *configuration* maintenance (srv_admin_state CMAINT) which HAProxy 2.6's
  `set server ... state ready` does not lift, so such a server could never be put back.
  Runtime states survive a reload through the server-state file (`servers.state`).
* frontend `test1` (cfg.test_port) -> backend `app_test`: seed 004's temporary test load
  balancer (steps 7 to 11). It has no servers in the configuration: a procedure attaches
  them at run time (`add server`, `enable health`, `enable server`) and detaches them
  (`del server`), never with a reload.
* `app`, `app_secondary` and `app_test` check `GET /health` with `http-check
  disable-on-404`: a node whose health file is gone answers 404 and goes NOLB (no new
  sessions, its open ones finish; seed 003 step 12), a 200 puts it back in rotation.
* a maintenance page on `main` (seed 004 step 18), served by HAProxy itself (503,
  `Retry-After`, haproxy/maintenance.html) while the entry `main` of the map
  haproxy/maintenance.map is `on`: `set map <map> main on|off` switches it, no reload.
  A request whose `X-Zerodown-Preview` header holds a key the same map has with the
  value `preview` passes the page (seed 004 step 30 tests the new servers through `main`
  while the page is up): zerodown adds a one-time `zdpreview-<random>` key (`add map`)
  and deletes it after its test. The header is removed before a request reaches a node.

What survives a reload (a new process, `reload()`): the runtime states of the configured
servers (maint / drain / ready, weights: `servers.state`, loaded with
`load-server-state-from-file`) and the maintenance switch (`reload()` writes the map's
runtime entries into the map file first). Servers added at run time do NOT survive: the
new process only knows the servers of haproxy.cfg (HAProxy's own rule for dynamic servers,
management.txt "add server"), so whoever attached them attaches them again. A fresh start
(`start()` on a stopped HAProxy) begins with the initial states and `main off`. Preview
keys are runtime-only: neither a reload nor a start keeps them (the map file holds `main`
alone), and reset_servers deletes them.

With an OX part (cfg.ox_nodes > 0) the same pair again over the OX nodes (ox1..oxN):
* frontend `ox_main` (cfg.ox_main_port) -> backend `ox`, every OX node in rotation;
* frontend `ox_secondary` (cfg.ox_secondary_port) -> backend `ox_secondary`, all in
  maintenance: the seed's secondary load balancer, where upgraded nodes go.

The runtime API socket (`haproxy/admin.sock`, level admin) is what zerodown's activities
talk to, exactly as on a customer's HAProxy.
"""

from __future__ import annotations

import csv
import io
import socket
import subprocess
import time
from pathlib import Path

from lab.config import (
    BACKEND,
    OX_BACKEND,
    OX_SECONDARY_BACKEND,
    SECONDARY_BACKEND,
    TEST_BACKEND,
    LabConfig,
)
from lab.procs import pid_alive, port_open, read_pid, stop_pidfile

HAPROXY_BIN = "haproxy"
UP_TIMEOUT_S = 30.0
# The maintenance page's switch: this key of the maintenance map (`on` / `off`).
MAINTENANCE_KEY = "main"
MAINTENANCE_RETRY_AFTER_S = 30
# The maintenance page's bypass (lab inventory `preview_header`): a request whose header
# value is a key of the maintenance map with the value PREVIEW_VALUE passes the page.
PREVIEW_HEADER = "X-Zerodown-Preview"
PREVIEW_VALUE = "preview"
# What zerodown's one-time keys start with (activities/haproxy.py PREVIEW_KEY_PREFIX).
PREVIEW_KEY_PREFIX = "zdpreview-"
# The backends whose servers a procedure may attach at run time (reset_servers removes them).
SITE_BACKENDS = (BACKEND, SECONDARY_BACKEND, TEST_BACKEND)
# A fresh page per maintenance: small (HAProxy keeps it in a buffer), self-contained.
MAINTENANCE_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Down for maintenance</title></head>
<body>
<h1>Down for maintenance</h1>
<p>The site is being upgraded and will be back shortly. Please try again in a few minutes.</p>
</body>
</html>
"""


class HAProxyError(RuntimeError):
    """HAProxy failed to start / answer; the message says where and why."""


def config_path(cfg: LabConfig) -> Path:
    return cfg.haproxy_dir / "haproxy.cfg"


def pid_file(cfg: LabConfig) -> Path:
    return cfg.haproxy_dir / "haproxy.pid"


def state_file(cfg: LabConfig) -> Path:
    return cfg.haproxy_dir / "servers.state"


def maintenance_map(cfg: LabConfig) -> Path:
    """The map file the maintenance rule reads (its absolute path is the map's name in the
    runtime API: `set map <path> main on`)."""
    return cfg.haproxy_dir / "maintenance.map"


def maintenance_page(cfg: LabConfig) -> Path:
    return cfg.haproxy_dir / "maintenance.html"


def secondary_backends(cfg: LabConfig) -> list[str]:
    return [SECONDARY_BACKEND] + ([OX_SECONDARY_BACKEND] if cfg.ox_nodes else [])


def start_log(cfg: LabConfig) -> Path:
    # In daemon mode HAProxy has no stderr after start-up; this keeps what it said while starting.
    return cfg.haproxy_dir / "haproxy.log"


def backend_servers(cfg: LabConfig, backend: str) -> dict[str, int]:
    """Server name -> port of every server of one of the lab's backends."""
    if backend in (BACKEND, SECONDARY_BACKEND):
        return {cfg.node_name(i): cfg.app_port(i) for i in cfg.node_indexes}
    if backend == TEST_BACKEND:
        return {}  # servers are only ever attached at run time
    if backend in (OX_BACKEND, OX_SECONDARY_BACKEND):
        return {cfg.ox_node_name(i): cfg.ox_app_port(i) for i in cfg.ox_node_indexes}
    raise ValueError(f"no lab backend {backend!r}")


def _servers(cfg: LabConfig, backend: str, extra: str = "") -> list[str]:
    return [
        f"    server {name} 127.0.0.1:{port} check{extra}"
        for name, port in backend_servers(cfg, backend).items()
    ]


def frontend_ports(cfg: LabConfig) -> list[int]:
    ox = [cfg.ox_main_port, cfg.ox_secondary_port] if cfg.ox_nodes else []
    return [cfg.main_port, cfg.secondary_port, cfg.test_port, *ox]


def _backend(name: str, servers: list[str], disable_on_404: bool = False) -> list[str]:
    # roundrobin is one of the "dynamic" algorithms `add server` requires.
    return [
        f"backend {name}",
        "    balance roundrobin",
        "    option httpchk GET /health",
        # A 404 (health file gone) from a server that is UP makes it NOLB: no new sessions,
        # the open ones finish. Checked before the expect rule below.
        *(["    http-check disable-on-404"] if disable_on_404 else []),
        "    http-check expect status 200",
        # `retry-on` below also replays requests that already reached a server; allow that
        # only for methods that are safe to repeat. A POST is retried only when its
        # connection failed (it was never sent), so no item is ever written twice.
        "    http-request disable-l7-retry unless METH_GET or METH_HEAD or METH_OPTIONS",
        # Lets tests and the probe see which server answered (%s = server name).
        "    http-response set-header X-Served-By %s",
        *servers,
        "",
    ]


def render_config(cfg: LabConfig) -> str:
    sock = cfg.haproxy_socket
    if len(str(sock)) > 107:
        raise HAProxyError(f"runtime API socket path {sock} is longer than 107 bytes; use a shorter lab root")
    lines = [
        "# Generated by lab/haproxy.py - the lab's load balancer. Edit the generator, not this file.",
        "global",
        # expose-fd listeners: a reload (`-x admin.sock -sf <pid>`) takes the listening
        # sockets over, so no connection is refused while HAProxy itself restarts.
        f"    stats socket {sock} mode 600 level admin expose-fd listeners",
        # Written just before a reload, read by the new process: runtime states (maint,
        # drain, ready, weights) a procedure set are kept across it.
        f"    server-state-file {state_file(cfg)}",
        "    stats timeout 30s",
        "    maxconn 2000",
        "",
        "defaults",
        "    mode http",
        "    load-server-state-from-file global",
        # Fast detection (a stopped node leaves rotation within ~1 s, a started one returns
        # after two good checks) keeps rolling deploys short in the lab.
        "    default-server inter 500ms fall 2 rise 2",
        "    option redispatch",
        "    retries 3",
        "    retry-on conn-failure empty-response response-timeout",
        "    timeout connect 2s",
        "    timeout client 30s",
        "    timeout server 30s",
        "    timeout http-keep-alive 2s",
        "    timeout queue 5s",
        "",
        "frontend main",
        f"    bind 127.0.0.1:{cfg.main_port}",
        # The maintenance page: answered by HAProxy itself, before any backend, while the
        # map entry is `on` (a missing entry counts as off), except to a request whose
        # preview header names a `preview` key of the same map (added at run time).
        f'    http-request return status 503 content-type "text/html; charset=utf-8" '
        f"file {maintenance_page(cfg)} hdr Retry-After {MAINTENANCE_RETRY_AFTER_S} "
        f"hdr Cache-Control no-store "
        f"if {{ str({MAINTENANCE_KEY}),map({maintenance_map(cfg)},off) -m str on }} "
        f"!{{ req.hdr({PREVIEW_HEADER.lower()}),map({maintenance_map(cfg)},none) -m str {PREVIEW_VALUE} }}",
        # The preview key is a credential for the page's bypass: no node sees (or logs) it.
        f"    http-request del-header {PREVIEW_HEADER.lower()}",
        f"    default_backend {BACKEND}",
        "",
        "frontend secondary",
        f"    bind 127.0.0.1:{cfg.secondary_port}",
        f"    default_backend {SECONDARY_BACKEND}",
        "",
        "frontend test1",
        f"    bind 127.0.0.1:{cfg.test_port}",
        f"    default_backend {TEST_BACKEND}",
        "",
        *_backend(BACKEND, _servers(cfg, BACKEND), disable_on_404=True),
        *_backend(SECONDARY_BACKEND, _servers(cfg, SECONDARY_BACKEND), disable_on_404=True),
        *_backend(TEST_BACKEND, [], disable_on_404=True),
    ]
    if cfg.ox_nodes:
        # The OX cluster's two load balancers, built like the site's (same options).
        lines += [
            "frontend ox_main",
            f"    bind 127.0.0.1:{cfg.ox_main_port}",
            f"    default_backend {OX_BACKEND}",
            "",
            "frontend ox_secondary",
            f"    bind 127.0.0.1:{cfg.ox_secondary_port}",
            f"    default_backend {OX_SECONDARY_BACKEND}",
            "",
            *_backend(OX_BACKEND, _servers(cfg, OX_BACKEND)),
            *_backend(OX_SECONDARY_BACKEND, _servers(cfg, OX_SECONDARY_BACKEND)),
        ]
    return "\n".join(lines)


def check_config(path: Path) -> None:
    r = subprocess.run(
        [HAPROXY_BIN, "-c", "-q", "-f", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    if r.returncode != 0:
        raise HAProxyError(
            f"HAProxy rejects {path} (haproxy -c exit {r.returncode}):\n{(r.stdout + r.stderr).strip()}"
        )


def _map_text(on: bool) -> str:
    return (
        "# The lab's maintenance switch (lab/haproxy.py): `set map` changes it at run time;\n"
        "# written at a fresh start and before each reload.\n"
        f"{MAINTENANCE_KEY} {'on' if on else 'off'}\n"
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _write_maintenance_files(cfg: LabConfig, on: bool | None) -> None:
    """The page (always as generated) and the map (`on` given: with that value; None:
    only when missing, `off`). Both must exist before HAProxy parses the config."""
    page = maintenance_page(cfg)
    if not page.exists() or page.read_text(encoding="utf-8") != MAINTENANCE_PAGE:
        _write_atomic(page, MAINTENANCE_PAGE)
    if on is not None or not maintenance_map(cfg).exists():
        _write_atomic(maintenance_map(cfg), _map_text(bool(on)))


def write_config(cfg: LabConfig) -> bool:
    """Write and validate haproxy.cfg; returns True when its content changed."""
    cfg.haproxy_dir.mkdir(parents=True, exist_ok=True)
    _write_maintenance_files(cfg, None)
    path = config_path(cfg)
    text = render_config(cfg)
    old = path.read_text(encoding="utf-8") if path.exists() else None
    if old == text:
        return False
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text, encoding="utf-8")
    check_config(tmp)
    tmp.replace(path)
    return True


def running(cfg: LabConfig) -> bool:
    return pid_alive(pid_file(cfg), expect="haproxy")


def _launch(cfg: LabConfig, extra: list[str]) -> None:
    cmd = [HAPROXY_BIN, "-D", "-f", str(config_path(cfg)), "-p", str(pid_file(cfg)), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL)
    with open(start_log(cfg), "a", encoding="utf-8") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)} -> exit {r.returncode}\n")
        log.write(r.stdout + r.stderr)
    if r.returncode != 0:
        raise HAProxyError(
            f"HAProxy did not start (exit {r.returncode}); log: {start_log(cfg)}\n"
            f"{(r.stdout + r.stderr).strip()}"
        )


def start(cfg: LabConfig) -> None:
    """Write the config and start HAProxy as a daemon; idempotent.

    When it already runs with the same config nothing happens (runtime states set by a
    procedure are kept); a changed config is applied with a seamless reload."""
    changed = write_config(cfg)
    if running(cfg):
        if changed:
            reload(cfg)
        return
    for port in frontend_ports(cfg):
        if port_open("127.0.0.1", port):
            raise HAProxyError(f"cannot start HAProxy: 127.0.0.1:{port} is already in use by another process")
    cfg.haproxy_socket.unlink(missing_ok=True)  # stale socket of a killed instance
    state_file(cfg).unlink(missing_ok=True)  # a fresh start begins with the initial states
    _write_maintenance_files(cfg, False)  # ... and without the maintenance page
    _launch(cfg, [])
    _wait_socket(cfg)
    _secondaries_to_maint(cfg)


def _secondaries_to_maint(cfg: LabConfig) -> None:
    for backend in secondary_backends(cfg):
        for n in backend_servers(cfg, backend):
            answer = runtime_command(cfg, f"set server {backend}/{n} state maint").strip()
            if answer:
                raise HAProxyError(f"HAProxy runtime API: maint {backend}/{n} answered {answer!r}")


def reload(cfg: LabConfig) -> None:
    """Seamless reload: the new process takes the listeners over from the old one (-x) and
    the old one finishes its connections (-sf)."""
    old = read_pid(pid_file(cfg))
    state = runtime_command(cfg, "show servers state")
    tmp = state_file(cfg).with_suffix(".new")
    tmp.write_text(state, encoding="utf-8")
    tmp.replace(state_file(cfg))
    # The new process reads the map from its file: carry the switch's runtime value over
    # (a process running an older config without the map has it off).
    try:
        on = maintenance_on(cfg)
    except HAProxyError:
        on = False
    _write_maintenance_files(cfg, on)
    extra = ["-x", str(cfg.haproxy_socket)]
    if old is not None:
        extra += ["-sf", str(old)]
    _launch(cfg, extra)
    _wait_socket(cfg)


def _wait_socket(cfg: LabConfig, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            runtime_command(cfg, "show info")
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise HAProxyError(
                    f"HAProxy runtime API {cfg.haproxy_socket} does not answer: {e}; log: {start_log(cfg)}"
                ) from e
            time.sleep(0.05)


def stop(cfg: LabConfig) -> bool:
    """Stop HAProxy (SIGTERM: immediate stop). Safe when not running."""
    stopped = stop_pidfile(pid_file(cfg), timeout=10, expect="haproxy")
    cfg.haproxy_socket.unlink(missing_ok=True)
    return stopped


def runtime_command(cfg: LabConfig, command: str, timeout: float = 5.0) -> str:
    """Send one runtime API command over the admin socket and return the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(cfg.haproxy_socket))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")


def stat_rows(cfg: LabConfig) -> list[dict[str, str]]:
    """`show stat` as CSV rows (one per frontend, backend and server)."""
    text = runtime_command(cfg, "show stat").lstrip("# ")
    return list(csv.DictReader(io.StringIO(text)))


def server_states(cfg: LabConfig) -> dict[tuple[str, str], str]:
    """(backend, server) -> status from `show stat` (UP, DOWN, MAINT, DRAIN, 'UP 1/2', ...)."""
    return {
        (r["pxname"], r["svname"]): r["status"]
        for r in stat_rows(cfg)
        if r.get("svname") not in ("FRONTEND", "BACKEND", None)
    }


def wait_all_up(cfg: LabConfig, backend: str = BACKEND, timeout: float = UP_TIMEOUT_S) -> None:
    """Wait until every server in `backend` (`app`, or `ox` for the OX nodes) is UP *and*
    its last health check passed.

    HAProxy starts servers in state UP before any check ran, so "UP" alone proves nothing
    right after a start or reload; the last check's result (L7OK) does."""
    wanted = set(backend_servers(cfg, backend))
    deadline = time.monotonic() + timeout
    while True:
        rows = {r["svname"]: r for r in stat_rows(cfg) if r.get("pxname") == backend}
        bad = {
            n: f"{rows[n]['status']} ({rows[n].get('check_status') or 'no check yet'})"
            if n in rows
            else "missing"
            for n in sorted(wanted)
            if n not in rows
            or rows[n]["status"] != "UP"
            or not (rows[n].get("check_status") or "").startswith("L7OK")
        }
        if not bad:
            return
        if time.monotonic() > deadline:
            raise HAProxyError(
                f"HAProxy backend {backend}: servers not UP after {timeout:.0f}s: {bad} "
                "(check the nodes' run/app.log and GET /health)"
            )
        time.sleep(0.2)


def status(cfg: LabConfig) -> dict[str, object]:
    """{running, pid, config, socket, servers: {"backend/server": status}, maintenance}."""
    up = running(cfg)
    out: dict[str, object] = {
        "running": up,
        "pid": read_pid(pid_file(cfg)) if up else None,
        "config": str(config_path(cfg)),
        "socket": str(cfg.haproxy_socket),
    }
    if up:
        try:
            out["servers"] = {f"{b}/{s}": st for (b, s), st in server_states(cfg).items()}
            out["maintenance"] = maintenance_on(cfg)
        except (OSError, HAProxyError) as e:
            out["error"] = f"runtime API: {e}"
    return out


def maintenance_on(cfg: LabConfig) -> bool:
    """The maintenance switch's runtime value (`show map`); a missing entry is off."""
    cmd = f"show map {maintenance_map(cfg)}"
    answer = runtime_command(cfg, cmd)
    for line in answer.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == MAINTENANCE_KEY:
            return parts[2] == "on"
    if answer.strip() and not answer.startswith("0x"):
        raise HAProxyError(f"HAProxy runtime API: {cmd!r} answered {answer.strip()!r}")
    return False


def preview_keys(cfg: LabConfig) -> list[str]:
    """The preview keys (PREVIEW_KEY_PREFIX...) of the maintenance map at run time: left by
    an interrupted preview check; a clean lab has none."""
    return [
        parts[1]
        for line in runtime_command(cfg, f"show map {maintenance_map(cfg)}").splitlines()
        if len(parts := line.split()) >= 3 and parts[1].startswith(PREVIEW_KEY_PREFIX)
    ]


def delete_preview_keys(cfg: LabConfig) -> int:
    """Delete every preview key of the maintenance map (`del map`); returns how many."""
    keys = preview_keys(cfg)
    for key in keys:
        _admin(cfg, f"del map {maintenance_map(cfg)} {key}")
    return len(keys)


def set_maintenance(cfg: LabConfig, on: bool) -> None:
    """Switch the maintenance page of `main` at run time (no reload)."""
    cmd = f"set map {maintenance_map(cfg)} {MAINTENANCE_KEY} {'on' if on else 'off'}"
    answer = runtime_command(cfg, cmd).strip()
    if answer:
        raise HAProxyError(f"HAProxy runtime API: {cmd!r} answered {answer!r}")


def runtime_servers(cfg: LabConfig) -> list[tuple[str, str]]:
    """(backend, server) of every server of the site's backends that is not in haproxy.cfg:
    attached at run time (`add server`)."""
    configured = {b: set(backend_servers(cfg, b)) for b in SITE_BACKENDS}
    return [
        (r["pxname"], r["svname"])
        for r in stat_rows(cfg)
        if r.get("pxname") in configured
        and r.get("svname") not in ("FRONTEND", "BACKEND", None)
        and r["svname"] not in configured[r["pxname"]]
    ]


def _admin(cfg: LabConfig, cmd: str, ok: tuple[str, ...] = ("",)) -> None:
    answer = runtime_command(cfg, cmd).strip()
    if answer not in ok:
        raise HAProxyError(f"HAProxy runtime API: {cmd!r} answered {answer!r}")


def delete_runtime_servers(cfg: LabConfig, timeout: float = 10.0) -> list[str]:
    """Remove the servers attached at run time (maint, sessions cut, deleted); returns
    "backend/server" of each. `del server` refuses while connections remain (idle ones
    too, which HAProxy closes on its own shortly after the sessions were cut), so it is
    retried until `timeout`."""
    done: list[str] = []
    for backend, server in runtime_servers(cfg):
        name = f"{backend}/{server}"
        _admin(cfg, f"set server {name} state maint")
        _admin(cfg, f"shutdown sessions server {name}")
        deadline = time.monotonic() + timeout
        while True:
            answer = runtime_command(cfg, f"del server {name}").strip()
            if answer == "Server deleted.":
                break
            if time.monotonic() > deadline:
                raise HAProxyError(f"HAProxy runtime API: 'del server {name}' answered {answer!r}")
            time.sleep(0.1)
        done.append(name)
    return done


def detached_servers(cfg: LabConfig) -> list[tuple[str, str]]:
    """(backend, server) of every server of haproxy.cfg that is no longer in its backend: a
    procedure detached it at run time (`del server`)."""
    present = {(r["pxname"], r["svname"]) for r in stat_rows(cfg)}
    return [(b, n) for b in SITE_BACKENDS for n in backend_servers(cfg, b) if (b, n) not in present]


def reset_servers(cfg: LabConfig) -> None:
    """Runtime state as just after start: every node ready in `app` at its initial weight,
    in maintenance in `app_secondary`; the same for the OX nodes in `ox` / `ox_secondary`.
    Servers attached at run time are removed (`app_test` empty again), servers of the
    configuration that were detached are back (a seamless reload re-reads them), and the
    maintenance page is off, without preview keys."""
    delete_runtime_servers(cfg)
    if detached_servers(cfg):
        reload(cfg)
    set_maintenance(cfg, False)
    delete_preview_keys(cfg)
    pairs = [(BACKEND, SECONDARY_BACKEND)] + ([(OX_BACKEND, OX_SECONDARY_BACKEND)] if cfg.ox_nodes else [])
    for main, secondary in pairs:
        for n in backend_servers(cfg, main):
            for cmd in (
                f"set server {main}/{n} state ready",
                f"set weight {main}/{n} 100%",
                f"set server {secondary}/{n} state maint",
            ):
                answer = runtime_command(cfg, cmd).strip()
                if answer:  # these commands answer nothing on success
                    raise HAProxyError(f"HAProxy runtime API: {cmd!r} answered {answer!r}")
