"""`python3 -m localservice`: a self-hosted stand-in for the Globus Compute web service,
on http://127.0.0.1:5000 (where the SDK's `local_compute_services=True` looks), backed
by the RabbitMQ on this machine. For the demo and the tests; never for production."""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import signal
import sys

from aiohttp import web

from localservice.auth import AuthService
from localservice.rabbit import Rabbit
from localservice.service import ComputeService
from localservice.web import make_app


def parse_args(argv):
    p = argparse.ArgumentParser(prog="localservice", description=__doc__)
    p.add_argument("--identities", required=True, type=pathlib.Path,
                   help="JSON file: static bearer tokens and their identity sets, Auth clients and logins "
                   "(docs/local-service.md); read again when it changes")
    p.add_argument("--state", type=pathlib.Path, help="where registered endpoints are kept across restarts")
    p.add_argument("--token-lifetime", type=float, default=172800,
                   help="seconds an access token from the Auth routes lasts (default %(default)s, as Globus Auth)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/",
                   help="an administrative RabbitMQ account (default %(default)s)")
    p.add_argument("--management-url", default="http://127.0.0.1:15672",
                   help="RabbitMQ's management API (default %(default)s)")
    p.add_argument("--purge-on-exit", action="store_true",
                   help="on exit, delete every queue, exchange and RabbitMQ account of the uep./mep./tg. kind "
                   "(for demos and tests: durable leftovers slow down RabbitMQ restarts)")
    return p.parse_args(argv)


async def serve(args) -> int:
    auth = AuthService(args.identities, f"http://{'localhost' if args.host == '127.0.0.1' else args.host}:{args.port}",
                       args.token_lifetime)
    rabbit = Rabbit(args.amqp_url, args.management_url)
    await rabbit.open()
    service = ComputeService(rabbit, args.state)
    runner = web.AppRunner(make_app(service, auth), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    logging.getLogger("localservice").info("local compute service on http://%s:%d", args.host, args.port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    if args.purge_on_exit:
        logging.getLogger("localservice").info("purged %d queues, exchanges and accounts", await rabbit.purge())
    await rabbit.close()
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="localservice %(levelname)s %(message)s", stream=sys.stderr)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(serve(args))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"localservice: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
