"""The lab's Open-Xchange middleware nodes: one folder per node, laid out like an OX server.

```
nodes/oxN/                   the node's SSH root (commands run here)
    ctl                      ./ctl start|stop|status|restart|reload (service control, kind: command;
                             reload = OX's reloadconfiguration: SIGHUP, waits for the confirmation)
    oxpkg                    ./oxpkg install <x.y.z> | ./oxpkg version (the package manager)
    installed/version        the installed release; the service runs what it read at start
    etc/server.properties    OX's server.properties (migrationRedirectURL goes here; not set at first)
    etc/system.properties    SERVER_NAME=oxserver (the old cluster's server in the config DB)
    etc/hazelcast.properties the Hazelcast cluster's group name (nodes with one name form one
                             cluster; seed 002 step 2 wants old and new releases apart). A
                             package install keeps it, as a package keeps a changed config file
    bin/                     OX's command line tools (lab/ox/tools.py) and their ox-tools.env;
                             runupdate brings a schema to *this node's* installed/version. Thin
                             clients of the service's admin endpoint (127.0.0.1, cfg.ox_admin_port;
                             lab/ox/admin.py), where they run: they fail while it is down
    opt/                     the inventory's app_dir (OX procedures do not deploy files)
    run/ox.pid, ox.log       the service (lab/ox/middleware.py); ox.reload: its reload confirmation
    inject/                  for fault files (none yet)
```

`install_ox_node` builds a folder; `start_ox_node` / `stop_ox_node` / `ox_node_running` run
`ctl`, as zerodown does over SSH. `reset_ox_node` puts a node back as installed.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from lab import nodes
from lab.config import LabConfig
from lab.ox import configdb, tools
from lab.procs import port_open

INITIAL_VERSION = configdb.DEFAULT_VERSION  # what every OX node runs after lab up / reset
SERVER_NAME = "oxserver"  # configdb.create's default server_name
PROCESS_MATCH = r"lab\.ox\.middleware"
STOP_TIMEOUT_S = 15  # the middleware's graceful shutdown waits up to 10 s
RELOAD_TIMEOUT_TENTHS = 100
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def server_properties_text(cfg: LabConfig, i: int) -> str:
    # A few real OX keys for realism; the service only reads migrationRedirectURL.
    return (
        f"# server.properties of Open-Xchange node {cfg.ox_node_name(i)} (lab stand-in, written by\n"
        "# lab/ox/nodes.py). key=value; `./ctl reload` applies changes without a restart.\n"
        "com.openexchange.server.considerXForwards=true\n"
        "com.openexchange.server.forHeader=X-Forwarded-For\n"
        "com.openexchange.IPCheck=true\n"
    )


def system_properties_text(cfg: LabConfig, i: int, server_name: str = SERVER_NAME) -> str:
    return (
        f"# system.properties of Open-Xchange node {cfg.ox_node_name(i)} (lab stand-in).\n"
        "# The name this node's server is registered under in the config DB (table server):\n"
        "# it serves the contexts pointed at that server.\n"
        f"SERVER_NAME={server_name}\n"
    )


HAZELCAST_GROUP = "oxcluster"


def hazelcast_properties_text(cfg: LabConfig, i: int) -> str:
    # Key names from OX's documentation/administration/running_a_cluster.md.
    return (
        f"# hazelcast.properties of Open-Xchange node {cfg.ox_node_name(i)} (lab stand-in).\n"
        "# Only nodes using the same group name join each other and form the cluster.\n"
        f"com.openexchange.hazelcast.group.name={HAZELCAST_GROUP}\n"
        "com.openexchange.hazelcast.network.join=static\n"
    )


# Launch snippet for nodes.render_ctl: the service runs from the node folder; PYTHONPATH
# finds the `lab` package (the service starts nothing that could inherit it).
_LAUNCH = """\
  if [ ! -s "$HERE/installed/version" ]; then
    echo "open-xchange is not installed in $HERE (no installed/version)" >&2; return 1
  fi
  cd "$HERE" || return 1
  echo "--- $(date '+%Y-%m-%d %H:%M:%S') ctl start" >> "$LOG"
  # setsid: own session, so the service outlives the SSH session that started it (no job
  # control here: setsid and nohup exec in place and $! is the service's pid).
  PYTHONPATH=@ROOT@ setsid nohup "$PY" -m lab.ox.middleware --node-dir "$HERE" --name @NODE@ \\
    --port "$PORT" --admin-port @ADMIN_PORT@ >> "$LOG" 2>&1 < /dev/null &"""

_RELOAD = """
# reload: OX's reloadconfiguration. SIGHUP makes the service re-read etc/server.properties and
# etc/system.properties; it confirms by rewriting run/ox.reload ("<pid> <generation> ok|error").
GENFILE="$HERE/run/ox.reload"

# The generation the service with pid $1 last confirmed (fails if it has confirmed none yet).
generation() {
  line=$(cat "$GENFILE" 2>/dev/null) || return 1
  set -- "$1" $line
  [ "$#" -ge 3 ] && [ "$2" = "$1" ] || return 1
  echo "$3"
}

reload() {
  if ! pid=$(running_pid); then echo "open-xchange is not running" >&2; return 1; fi
  # A service still starting may not handle SIGHUP yet (it would die of it): wait for its
  # first confirmation, written before its port opens.
  i=0
  until old=$(generation "$pid"); do
    if ! alive "$pid" || [ "$i" -ge @RELOAD_TENTHS@ ]; then
      echo "open-xchange (pid $pid) is not ready for a reload" >&2; return 1
    fi
    sleep 0.1; i=$((i + 1))
  done
  kill -HUP "$pid" 2>/dev/null || { echo "cannot signal open-xchange (pid $pid)" >&2; return 1; }
  i=0
  while [ "$i" -lt @RELOAD_TENTHS@ ]; do
    if new=$(generation "$pid") && [ "$new" != "$old" ]; then
      set -- $(cat "$GENFILE")
      if [ "${3:-}" = ok ]; then echo "configuration reloaded (generation $new)"; return 0; fi
      shift 3; echo "reload failed: $*" >&2; return 1
    fi
    if ! alive "$pid"; then
      echo "open-xchange (pid $pid) exited during the reload" >&2; tail -n 20 "$LOG" >&2; return 1
    fi
    sleep 0.1; i=$((i + 1))
  done
  echo "open-xchange (pid $pid) did not confirm the reload within @RELOAD_S@ s" >&2
  return 1
}
"""

_OXPKG = r"""#!/bin/sh
# The package manager of lab OX node @NODE@ (generated by lab/ox/nodes.py).
#   ./oxpkg install <x.y.z>   install that release (idempotent); the running service keeps
#                             its release until `./ctl restart`, as after a real package upgrade
#   ./oxpkg version           print the installed release
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
FILE="$HERE/installed/version"

valid() {
  case "$1" in ''|*[!0-9.]*|.*|*.|*..*) return 1 ;; esac
  [ "$(printf '%s' "$1" | tr -cd . | wc -c)" -eq 2 ]
}

case "${1:-}" in
  install)
    v="${2:-}"
    if ! valid "$v"; then echo "oxpkg: invalid release '$v' (expected x.y.z, e.g. 7.10.1)" >&2; exit 2; fi
    old=$(cat "$FILE" 2>/dev/null || true)
    if [ "$old" = "$v" ]; then echo "open-xchange $v is already installed"; exit 0; fi
    mkdir -p "$HERE/installed"
    printf '%s\n' "$v" > "$FILE.new" && mv "$FILE.new" "$FILE" || exit 1
    echo "open-xchange $v installed (was ${old:-none}); restart the service to run it"
    ;;
  version)
    [ -s "$FILE" ] || { echo "oxpkg: open-xchange is not installed" >&2; exit 1; }
    cat "$FILE"
    ;;
  *) echo "usage: $0 install <x.y.z> | version" >&2; exit 2 ;;
esac
"""


def ctl_script(cfg: LabConfig, i: int) -> str:
    reload_s = RELOAD_TIMEOUT_TENTHS // 10
    return nodes.render_ctl(
        cfg,
        cfg.ox_node_name(i),
        cfg.ox_app_port(i),
        generator="lab/ox/nodes.py",
        what="open-xchange",
        proc="ox",
        match=PROCESS_MATCH,
        launch=_LAUNCH.replace("@ROOT@", shlex.quote(str(PROJECT_ROOT))).replace(
            "@ADMIN_PORT@", str(cfg.ox_admin_port(i))
        ),
        stop_timeout_s=STOP_TIMEOUT_S,
        help_lines="#   ./ctl reload   re-read etc/*.properties without a restart; exit 0 once confirmed\n",
        funcs=_RELOAD.replace("@RELOAD_TENTHS@", str(RELOAD_TIMEOUT_TENTHS)).replace(
            "@RELOAD_S@", str(reload_s)
        ),
        cases="  reload) reload ;;\n",
        verbs="|reload",
    )


def oxpkg_script(cfg: LabConfig, i: int) -> str:
    return _OXPKG.replace("@NODE@", cfg.ox_node_name(i))


def version_file(cfg: LabConfig, i: int) -> Path:
    return cfg.ox_node_dir(i) / "installed" / "version"


def install_tools(cfg: LabConfig, i: int, runupdate_seconds: float | None = None) -> Path:
    """OX's tools in node i's bin/, talking to the lab's config DB; runupdate targets the
    node's installed release. Returns bin/."""
    overrides = {"OX_VERSION_FILE": str(version_file(cfg, i))}
    if runupdate_seconds is not None:
        overrides["OX_RUNUPDATE_SECONDS"] = f"{max(0.0, runupdate_seconds):g}"
    bin_dir = cfg.ox_node_dir(i) / "bin"
    # Thin clients of the node's middleware (lab/ox/admin.py), as OX's tools are of its RMI
    # interface: they work while the node's service runs.
    tools.install_tools(
        bin_dir,
        str(Path(cfg.python).absolute()),
        configdb.tools_env(cfg, **overrides),
        admin_port=cfg.ox_admin_port(i),
    )
    return bin_dir


def set_runupdate_seconds(cfg: LabConfig, seconds: float) -> None:
    """runupdate's work per schema on every OX node (rewrites each node's tools env)."""
    for i in cfg.ox_node_indexes:
        install_tools(cfg, i, runupdate_seconds=seconds)


def _write(path: Path, text: str, mode: int | None = None) -> bool:
    """Write `text` unless the file already holds it; True when it wrote."""
    try:
        if path.read_text(encoding="utf-8") == text:
            if mode is not None:
                path.chmod(mode)
            return False
    except OSError:
        pass
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text, encoding="utf-8")
    if mode is not None:
        tmp.chmod(mode)
    tmp.replace(path)
    return True


def install_ox_node(cfg: LabConfig, i: int, version: str = INITIAL_VERSION) -> bool:
    """(Re)write node i's folder as installed: scripts, properties as shipped (no redirect
    URL, SERVER_NAME=oxserver), `version` installed, the tools with their default settings;
    inject/ emptied. Logs stay. Neither starts nor stops the service. True when a file the
    service reads (properties, version) changed, i.e. a running service needs a restart."""
    node = cfg.ox_node_dir(i)
    for d in (node, node / "etc", node / "installed", node / "run", node / "inject", node / "opt"):
        d.mkdir(parents=True, exist_ok=True)
    _write(node / "ctl", ctl_script(cfg, i), 0o755)
    _write(node / "oxpkg", oxpkg_script(cfg, i), 0o755)
    changed = [
        _write(node / "etc" / "server.properties", server_properties_text(cfg, i)),
        _write(node / "etc" / "system.properties", system_properties_text(cfg, i)),
        _write(node / "etc" / "hazelcast.properties", hazelcast_properties_text(cfg, i)),
        _write(version_file(cfg, i), version + "\n"),
    ]
    install_tools(cfg, i)
    for p in (node / "inject").iterdir():
        p.unlink(missing_ok=True)
    return any(changed)


def installed(cfg: LabConfig, i: int) -> bool:
    node = cfg.ox_node_dir(i)
    return (node / "ctl").exists() and version_file(cfg, i).exists() and (node / "bin" / "runupdate").exists()


# --------------------------------------------------------------------------- service control


def ctl(cfg: LabConfig, i: int, action: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `./ctl <action>` in OX node i's folder (as the SSH endpoint would)."""
    return subprocess.run(
        ["sh", "-c", f"./ctl {shlex.quote(action)}"],
        cwd=cfg.ox_node_dir(i),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _checked(cfg: LabConfig, i: int, action: str) -> None:
    r = ctl(cfg, i, action)
    if r.returncode != 0:
        raise RuntimeError(f"{cfg.ox_node_name(i)}: ctl {action} exited {r.returncode}: {r.stderr.strip()}")


def start_ox_node(cfg: LabConfig, i: int) -> None:
    """Start OX node i's service; returns once its port accepts connections."""
    _checked(cfg, i, "start")


def restart_ox_node(cfg: LabConfig, i: int) -> None:
    _checked(cfg, i, "restart")


def stop_ox_node(cfg: LabConfig, i: int) -> None:
    """Stop OX node i's service gracefully (no-op when stopped or not installed)."""
    if (cfg.ox_node_dir(i) / "ctl").exists():
        _checked(cfg, i, "stop")


def ox_node_running(cfg: LabConfig, i: int) -> bool:
    if not (cfg.ox_node_dir(i) / "ctl").exists():
        return False
    return ctl(cfg, i, "status").returncode == 0


def oxpkg(cfg: LabConfig, i: int, *args: str) -> str:
    """Run `./oxpkg <args>` in OX node i's folder; its stdout, RuntimeError when it fails."""
    r = subprocess.run(
        ["./oxpkg", *args],
        cwd=cfg.ox_node_dir(i),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(
            f"{cfg.ox_node_name(i)}: oxpkg {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}"
        )
    return r.stdout


def running_version(cfg: LabConfig, i: int, timeout: float = 5.0) -> dict[str, object] | None:
    """The service's GET /version answer, None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{cfg.ox_app_port(i)}/version", timeout=timeout) as r:
            data = json.loads(r.read().decode("utf-8"))
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return data if isinstance(data, dict) else None


def reset_ox_node(cfg: LabConfig, i: int) -> str | None:
    """Node i as just after lab up: files reinstalled at INITIAL_VERSION and the service
    running them. Restarts only when needed (a file changed, or the service is down or runs
    other settings, or lacks the tools' endpoint); returns what was done, None when nothing
    was needed."""
    changed = install_ox_node(cfg, i)
    if not ox_node_running(cfg, i):
        start_ox_node(cfg, i)
        return f"started {cfg.ox_node_name(i)}"
    want = {"version": INITIAL_VERSION, "server_name": SERVER_NAME, "migration_redirect_url": None}
    answer = running_version(cfg, i)
    # A service started by an older checkout has no admin endpoint: its tools cannot work.
    serves_tools = port_open("127.0.0.1", cfg.ox_admin_port(i))
    as_installed = answer is not None and all(answer.get(k) == v for k, v in want.items())
    if not changed and serves_tools and as_installed:
        return None
    restart_ox_node(cfg, i)
    return f"restarted {cfg.ox_node_name(i)} as installed"
