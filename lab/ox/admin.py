"""The admin endpoint of a lab OX node: its command line tools run inside the middleware.

OX's command line tools are thin clients: registerserver, changeserver, runupdate, ... call
the running middleware over RMI/JMX, which does the work; a node whose middleware is down
has tools that fail ("Connection refused to host"). The lab does the same: each middleware
process (lab/ox/middleware.py) listens on a unix socket in its node folder,
`run/admin.sock` (mode 0600: only the node's own user, like RMI bound to localhost), and
runs the tool asked for in-process (`lab.ox.tools.main`) in a thread of its own, so a
runupdate working for seconds never blocks the node's HTTP service or the other tools.
The installed `bin/<tool>` (lab.ox.tools.install_tools with `admin_socket`) is a tiny
client (`python -SI`, builtin modules only: a few ms of CPU instead of the ~150 ms of a
fresh interpreter importing pymysql) that forwards what the tool reads:

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
import traceback
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lab.ox import tools

SOCKET_NAME = "admin.sock"
# Threads for tools running at once. The workflow runs at most 32 schemata at a time (each
# one tool at a time) plus its preflight; asyncio's default executor (cores + 4) would make
# the 7th concurrent runupdate wait for a free thread.
MAX_TOOLS = 64
MAX_FRAME = 16 * 1024 * 1024
# Environment keys a client may forward (what the tools read); OX_TOOLS_ENV is the node's.
FORWARDED_PREFIX = "OX_"
FORWARDED_KEYS = frozenset({"ADMIN_PASSWORD"})
log = logging.getLogger("lab.ox.admin")


def socket_path(node_dir: Path) -> Path:
    return node_dir / "run" / SOCKET_NAME


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

    def __init__(self, kind: bytes, loop: asyncio.AbstractEventLoop,
                 queue: asyncio.Queue[tuple[bytes, bytes] | None]) -> None:
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
        return tools.main(req.argv, stdin=io.StringIO(req.stdin), stdout=stdout, stderr=stderr,
                          environ=environ)
    except Exception:  # a bug of the stand-in: say so, as a JVM prints its stack trace
        stderr.write(traceback.format_exc())
        return 1


class AdminServer:
    """The node's admin endpoint (start / close from the middleware's startup / cleanup)."""

    def __init__(self, node_dir: Path) -> None:
        self.node_dir = node_dir
        self.path = socket_path(node_dir)
        self._executor = ThreadPoolExecutor(max_workers=MAX_TOOLS, thread_name_prefix="ox-tool")
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # left by a killed middleware
        old = os.umask(0o177)  # created 0600: no window in which another user could connect
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)
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


# bin/<tool> in client mode. `-S -I`: no site (the venv's packages are not needed), no
# environment-driven imports; only builtin modules (_socket, os, sys), so the interpreter
# starts in a few ms. Kept dependency-free on purpose: it is the whole cost of a tool call.
CLIENT_TEMPLATE = '''#!{python} -SI
# Open-Xchange command line tool `{tool}`: the lab's stand-in (lab/ox/tools.py) as a thin
# client of this node's middleware (lab/ox/admin.py), like OX's own tools of its RMI
# interface. Written by lab.ox.tools.install_tools; the settings are in {env_name}.
import _socket
import os
import sys

SOCK = {sock!r}
TOOL = {tool!r}


def frame(kind, data):
    return kind + str(len(data)).encode() + b"\\n" + data


def write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


def main():
    req = [frame(b"a", TOOL.encode())]
    req += [frame(b"a", os.fsencode(a)) for a in sys.argv[1:]]
    for key, value in os.environ.items():
        if (key.startswith("OX_") and key != "OX_TOOLS_ENV") or key == "ADMIN_PASSWORD":
            req.append(frame(b"v", os.fsencode(key + "=" + value)))
    data = b""
    if TOOL == "upgradeschemata":  # the only tool that reads standard input (its prompt)
        chunks = []
        while True:
            chunk = os.read(0, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
    req += [frame(b"i", data), frame(b"g", b"")]
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.connect(SOCK)
        s.sendall(b"".join(req))
    except OSError as e:
        write_all(2, ("Error: Connection refused to host: localhost; nested exception is: \\n"
                      "\\tjava.net.ConnectException: Connection refused (the open-xchange service of "
                      "this node does not answer on " + SOCK + ": " + str(e.strerror or e) + ")\\n").encode())
        return {exit_unreachable}
    buf = b""
    while True:
        nl = buf.find(b"\\n")
        if nl > 0:
            end = nl + 1 + int(buf[1:nl])
            if len(buf) >= end:
                kind, payload, buf = buf[:1], buf[nl + 1:end], buf[end:]
                if kind == b"o":
                    write_all(1, payload)
                elif kind == b"e":
                    write_all(2, payload)
                elif kind == b"x":
                    return int(payload)
                continue
        chunk = s.recv(65536)
        if not chunk:
            write_all(2, b"Error: the open-xchange service closed the connection before the tool ended\\n")
            return {exit_unreachable}
        buf += chunk


sys.exit(main())
'''


def client_script(python: str, tool: str, sock: Path, env_name: str = tools.ENV_FILE_NAME) -> str:
    return CLIENT_TEMPLATE.format(python=python, tool=tool, sock=str(sock), env_name=env_name,
                                  exit_unreachable=tools.EXIT_COMMUNICATION_ERROR)
