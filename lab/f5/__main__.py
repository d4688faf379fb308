"""`python -m lab.f5`: the lab's BIG-IP stand-in as a process (lab/f5/lab.py starts it).

    python -m lab.f5 --port 18052 --config .lab/f5/config.json --state-dir .lab/f5 \
        --haproxy-socket .lab/haproxy/admin.sock [--token-lifetime-s 1200]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from aiohttp import web

from lab.f5 import facts
from lab.f5.config import load_config
from lab.f5.server import StandIn, ssl_context
from lab.f5.tls import ensure_tls


async def _main(args: argparse.Namespace) -> None:
    state_dir = Path(args.state_dir)
    tls = ensure_tls(state_dir)  # creates the state dir too
    stand_in = StandIn(load_config(Path(args.config)), state_dir, args.haproxy_socket, args.token_lifetime_s)
    runner = web.AppRunner(stand_in.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, ssl_context=ssl_context(tls.cert, tls.key))
    await site.start()
    logging.getLogger("lab.f5").info("listening on https://%s:%s (CA %s)", args.host, args.port, tls.ca)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m lab.f5", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--config", required=True, help="pools, members and users (lab/f5/config.py)")
    p.add_argument("--state-dir", required=True, help="TLS files, pool settings, the restart switch")
    p.add_argument("--haproxy-socket", required=True, help="HAProxy's runtime API (admin level)")
    p.add_argument(
        "--token-lifetime-s",
        type=int,
        default=facts.DEFAULT_TOKEN_TIMEOUT_S,
        help=f"a new token's timeout (BIG-IP: {facts.DEFAULT_TOKEN_TIMEOUT_S}); small values for tests",
    )
    p.add_argument("--debug", action="store_true")
    args = p.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
