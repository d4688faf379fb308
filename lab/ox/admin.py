"""The admin endpoint of a lab OX node: its command line tools run inside the middleware.

OX's command line tools are thin clients: registerserver, changeserver, runupdate, ... call
the running middleware over RMI/JMX on localhost, which does the work; a node whose
middleware is down has tools that fail ("Connection refused to host"). The lab does the
same: each middleware process (lab/ox/middleware.py) listens on 127.0.0.1 only, on the
node's admin port (LabConfig.ox_admin_port: +80+i), and runs the tool asked for
in-process (`lab.ox.tools.main`) in a thread of its own, so a runupdate working for seconds
never blocks the node's HTTP service or the other tools. Like OX's RMI port, anyone on the
host may connect; the tools check the master admin's credentials themselves.
The installed `bin/<tool>` (lab.ox.tools.install_tools with `admin_port`) is a tiny bash
client (bash's /dev/tcp, builtins only: ~2 ms of CPU per call; a `python -SI` client
costs 8-10 ms, the interpreter's start alone, and a fresh interpreter importing pymysql
~150 ms) that forwards what the tool reads:

  * its arguments;
  * the environment keys the tools read: OX_* (but OX_TOOLS_ENV: the middleware uses its
    node's bin/ox-tools.env, as the direct mode's wrapper does) and ADMIN_PASSWORD;
  * standard input, read to its end, for upgradeschemata (the only tool that reads it: the
    "already registered" prompt); the others never read it, as in the direct mode.

and prints what the tool writes, as it writes it, on its own stdout / stderr, then exits
with the tool's exit code. Semantics, outputs and exit codes are the tool's own (the same
code runs). The tool's settings come from the node's env file, read at every call (like the
direct mode's wrapper): `set_runupdate_seconds` or an `oxpkg install` count for the next call
without a restart. A middleware that does not answer: "Error: Connection refused to host:
localhost; ..." on stderr and exit 105, OX's SYSEXIT_COMMUNICATION_ERROR for an RMI
ConnectException (ObjectNamingAbstraction.printErrors).

Wire format, both ways: frames `<kind: 1 byte><payload length, decimal>\\n<payload>`.
Client -> middleware: `a` argument (the first is the tool's name), `v` KEY=VALUE, `i`
standard input, `g` end of the request. Middleware -> client: `o` stdout, `e` stderr (in
the order the tool wrote them), `x` the exit code (decimal), last.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import traceback
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lab.ox import tools

# Threads for tools running at once. The workflow runs at most 32 schemata at a time (each
# one tool at a time) plus its preflight; asyncio's default executor (cores + 4) would make
# the 7th concurrent runupdate wait for a free thread.
MAX_TOOLS = 64
MAX_FRAME = 16 * 1024 * 1024
# Environment keys a client may forward (what the tools read); OX_TOOLS_ENV is the node's.
FORWARDED_PREFIX = "OX_"
FORWARDED_KEYS = frozenset({"ADMIN_PASSWORD"})
log = logging.getLogger("lab.ox.admin")


def forwarded(key: str) -> bool:
    return (key.startswith(FORWARDED_PREFIX) and key != "OX_TOOLS_ENV") or key in FORWARDED_KEYS


def frame(kind: bytes, payload: bytes) -> bytes:
    return kind + str(len(payload)).encode() + b"\n" + payload


class ProtocolError(Exception):
    pass


async def read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\n")
    kind, size = head[:1], head[1:-1]
    if not size.isdigit() or int(size) > MAX_FRAME:
        raise ProtocolError(f"bad frame header {head[:40]!r}")
    return kind, await reader.readexactly(int(size))


@dataclass
class Request:
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    stdin: str = ""


async def read_request(reader: asyncio.StreamReader) -> Request:
    req = Request()
    while True:
        kind, payload = await read_frame(reader)
        text = os.fsdecode(payload)
        if kind == b"a":
            req.argv.append(text)
        elif kind == b"v":
            key, eq, value = text.partition("=")
            if eq and forwarded(key):  # anything else is not the client's to set
                req.env[key] = value
        elif kind == b"i":
            req.stdin = payload.decode("utf-8", errors="replace")
        elif kind == b"g":
            if not req.argv:
                raise ProtocolError("no tool named")
            return req
        else:
            raise ProtocolError(f"unknown frame {kind!r}")


class _Stream(io.StringIO):
    """A tool's stdout / stderr: every write becomes a frame for the client, queued on the
    event loop from the tool's thread (so the order of stdout and stderr is kept)."""

    def __init__(
        self, kind: bytes, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[bytes, bytes] | None]
    ) -> None:
        super().__init__()
        self._kind, self._loop, self._queue = kind, loop, queue

    def write(self, s: str) -> int:
        if s:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (self._kind, s.encode("utf-8")))
        return len(s)


def run_tool(node_dir: Path, req: Request, stdout: io.StringIO, stderr: io.StringIO) -> int:
    """The tool in this thread, with the node's settings (its env file) and the client's keys."""
    environ: Mapping[str, str] = {"OX_TOOLS_ENV": str(node_dir / "bin" / tools.ENV_FILE_NAME), **req.env}
    try:
        return tools.main(
            req.argv, stdin=io.StringIO(req.stdin), stdout=stdout, stderr=stderr, environ=environ
        )
    except Exception:  # a bug of the stand-in: say so, as a JVM prints its stack trace
        stderr.write(traceback.format_exc())
        return 1


class AdminServer:
    """The node's admin endpoint (start / close from the middleware's startup / cleanup)."""

    def __init__(self, node_dir: Path, port: int) -> None:
        self.node_dir = node_dir
        self.port = port
        self._executor = ThreadPoolExecutor(max_workers=MAX_TOOLS, thread_name_prefix="ox-tool")
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        # 127.0.0.1 only, like OX's RMI registry on localhost (never behind a load balancer).
        self._server = await asyncio.start_server(
            self._handle, host="127.0.0.1", port=self.port, reuse_address=True
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # Tools under way finish (a runupdate is not cut half-way), as in a graceful shutdown.
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            req = await read_request(reader)
        except (ProtocolError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as e:
            log.warning("admin request refused: %s", e)
            writer.close()
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[bytes, bytes] | None] = asyncio.Queue()
        out, err = _Stream(b"o", loop, queue), _Stream(b"e", loop, queue)
        job = loop.run_in_executor(self._executor, run_tool, self.node_dir, req, out, err)
        # After the tool's last write (call_soon_threadsafe keeps the order): the end marker.
        job.add_done_callback(lambda _: queue.put_nowait(None))
        connected = True
        while (item := await queue.get()) is not None:
            if connected:
                connected = await _send(writer, frame(*item))
        # A client gone mid-tool (its SSH session cut) does not stop the tool: like sshd, the
        # command runs to its end.
        code = await job
        if connected and await _send(writer, frame(b"x", str(code).encode())):
            writer.close()


async def _send(writer: asyncio.StreamWriter, data: bytes) -> bool:
    try:
        writer.write(data)
        await writer.drain()
        return True
    except (ConnectionError, OSError):
        return False


# --------------------------------------------------------------------------- the client


# bin/<tool> in client mode: bash, builtins only (no fork: the client's whole cost is bash's
# start, ~2 ms of CPU). -p: no $BASH_ENV / $ENV and no functions from the environment.
# LC_ALL=C: ${#x} counts bytes and read -N reads bytes (the frames' lengths are in bytes).
CLIENT_TEMPLATE = r"""#!@BASH@ -p
# Open-Xchange command line tool `@TOOL@`: the lab's stand-in (lab/ox/tools.py) as a thin
# client of this node's middleware (lab/ox/admin.py, 127.0.0.1:@PORT@), like OX's own tools
# of its RMI interface. Written by lab.ox.tools.install_tools; the settings are in @ENV_NAME@.
export LC_ALL=C
TOOL=@TOOL@
PORT=@PORT@

refused() {
  printf 'Error: Connection refused to host: localhost; nested exception is: \n' >&2
  printf '\tjava.net.ConnectException: Connection refused (the open-xchange service of this' >&2
  printf ' node does not answer on 127.0.0.1:%s)\n' "$PORT" >&2
  exit @EXIT@
}

{ exec 3<>"/dev/tcp/127.0.0.1/$PORT"; } 2>/dev/null || refused
req="a${#TOOL}
$TOOL"
for a in "$@"; do
  req+="a${#a}
$a"
done
# What the tools read from the environment: OX_* (OX_TOOLS_ENV is the node's own) and
# ADMIN_PASSWORD.
for k in "${!OX_@}"; do
  [ "$k" = OX_TOOLS_ENV ] && continue
  kv="$k=${!k}"
  req+="v${#kv}
$kv"
done
if [ -n "${ADMIN_PASSWORD+set}" ]; then
  kv="ADMIN_PASSWORD=$ADMIN_PASSWORD"
  req+="v${#kv}
$kv"
fi
data=
# upgradeschemata is the only tool that reads standard input (its prompt): read to its end.
[ "$TOOL" = upgradeschemata ] && IFS= read -r -d '' data
req+="i${#data}
${data}g0
"
{ printf '%s' "$req" >&3; } 2>/dev/null || refused
while IFS= read -r head <&3; do
  kind=${head:0:1} n=${head:1} p=
  case $n in ''|*[!0-9]*) break ;; esac
  [ "$n" -gt 0 ] && IFS= read -r -d '' -N "$n" p <&3
  case $kind in
    o) printf '%s' "$p" ;;
    e) printf '%s' "$p" >&2 ;;
    x) exit "$p" ;;
  esac
done
printf 'Error: the open-xchange service closed the connection before the tool ended\n' >&2
exit @EXIT@
"""


def bash_path() -> str:
    return shutil.which("bash") or "/bin/bash"


def client_script(tool: str, port: int, env_name: str = tools.ENV_FILE_NAME) -> str:
    return (
        CLIENT_TEMPLATE.replace("@BASH@", bash_path())
        .replace("@TOOL@", tool)
        .replace("@PORT@", str(port))
        .replace("@ENV_NAME@", env_name)
        .replace("@EXIT@", str(tools.EXIT_COMMUNICATION_ERROR))
    )
