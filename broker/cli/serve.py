"""``broker serve`` (run the broker) and ``broker migrate``."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from broker import __version__
from broker.app import create_app
from broker.cli.common import pool
from broker.config import Config
from broker.logsafe import protect_handlers
from broker.output import say

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["cmd_migrate", "cmd_serve", "register"]


def register(commands: Commands) -> None:
    """``serve`` and ``migrate``."""
    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument("--host", help="listen address (default from [server] host)")
    serve.add_argument("--port", type=int, help="listen port (default from [server] port)")
    serve.set_defaults(run=cmd_serve, asynchronous=False)

    migrate = commands.add_parser("migrate", help="apply pending database migrations")
    migrate.set_defaults(run=cmd_migrate, asynchronous=True)


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    if args.host:
        config.server.host = args.host
    if args.port is not None:
        config.server.port = args.port
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    protect_handlers()  # no record, from any logger, writes a bearer token
    if config.database.url is None:
        say(
            f"starting the embedded PostgreSQL in {config.database.data_dir} "
            "(the first start initialises it)"
        )
    web.run_app(
        create_app(config),
        host=config.server.host,
        port=config.server.port,
        shutdown_timeout=config.server.shutdown_timeout,
        print=lambda _: say(_ready_message(config)),
        access_log=None,
    )
    say("broker stopped")
    return 0


def _ready_message(config: Config) -> str:
    """What ``broker serve`` says once it listens: where, and what it serves."""
    return (
        f"broker {__version__} ready: {config.public_url} (/healthz, /readyz"
        + (", /scim/v2" if config.home.scim_url else "; set [home] scim_url to serve /scim/v2")
        + ")"
        + (
            f"; admin API and /metrics on "
            f"http://{config.server.admin_host}:{config.server.admin_port}"
            if config.server.admin_port
            else ""
        )
        + "; Ctrl-C or SIGTERM stops it"
    )


async def cmd_migrate(config: Config, args: argparse.Namespace) -> int:
    async with pool(config) as database, database.acquire() as conn:
        version = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    print(f"database is at migration {version:04d}: up to date")
    return 0
