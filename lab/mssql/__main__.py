"""`python -m lab.mssql`: the lab's SQL Server stand-in as a process (lab/manager.py starts it).

    python -m lab.mssql --port 18040 --mariadb-socket .lab/mysql/primary/mysqld.sock \
        --state-dir .lab/mssql --logins .lab/mssql/logins.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from lab.mssql.engine import LabSqlServer, ServerConfig, load_logins
from lab.mssql.tds import serve


async def _main(args: argparse.Namespace) -> None:
    cfg = ServerConfig(
        mariadb_socket=args.mariadb_socket,
        state_dir=args.state_dir,
        logins=load_logins(args.logins),
        server_name=args.server_name,
    )
    server = await serve(LabSqlServer(cfg), args.host, args.port)
    logging.getLogger("lab.mssql").info("listening on %s:%s", args.host, server.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m lab.mssql", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mariadb-socket", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--logins", required=True)
    p.add_argument("--server-name", default="LABSQL")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
