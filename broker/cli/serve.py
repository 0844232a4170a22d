"""``broker serve`` (run the broker) and ``broker migrate``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from broker import __version__
from broker.app import ListenError, create_app
from broker.cli.common import pool
from broker.config import Config
from broker.credentials import forget_files
from broker.errors import InvalidValueError
from broker.logs import configure_logging
from broker.output import say
from broker.secrets import load_box

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["GC_THRESHOLDS", "cmd_migrate", "cmd_serve", "register", "settle_memory"]


def register(commands: Commands) -> None:
    """``serve`` and ``migrate``."""
    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument("--host", help="listen address (default from [server] host)")
    serve.add_argument("--port", type=int, help="listen port (default from [server] port)")
    serve.add_argument(
        "--workers",
        default="1",
        metavar="N|auto",
        help="processes sharing the domain-facing port (SO_REUSEPORT); auto: one per core. "
        "The first also runs the admin listener and the home poller (default 1)",
    )
    serve.add_argument(
        "--debug",
        action="store_true",
        help="on a start-up error, show the traceback too (by default: one line and the fix)",
    )
    serve.add_argument("--secondary", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(run=cmd_serve, asynchronous=False)

    migrate = commands.add_parser("migrate", help="apply pending database migrations")
    migrate.set_defaults(run=cmd_migrate, asynchronous=True)


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    if args.host:
        config.server.host = args.host
    if args.port is not None:
        config.server.port = args.port
    workers = worker_count(args.workers)
    configure_logging(config.log)  # [log] format and level; no record writes a bearer token
    if not args.debug:
        # A start-up refused part way leaves asyncio to close what was starting, and it logs
        # each with a traceback; the one line that names the fix says it all (--debug shows them).
        logging.getLogger("asyncio").addFilter(_quiet_closing)
    preflight(config)
    if args.secondary:
        # Another process of the same broker: the first one runs the admin listener and the
        # home poller; this one serves domains and delivers.
        config.server.admin_port = 0
        config.propagation.home_poll_interval = 0
    elif config.database.url is None:
        say(
            f"starting the embedded PostgreSQL in {config.database.data_dir} "
            "(the first start initialises it)"
        )
    app = create_app(config)
    app.on_startup.append(_reread_on_sighup)
    app.on_startup.append(settle_memory)
    if workers > 1 and not args.secondary:
        app.cleanup_ctx.append(
            functools.partial(
                _secondaries, config=config, count=workers - 1, config_file=args.config
            )
        )
    try:
        web.run_app(
            app,
            host=config.server.host,
            port=config.server.port,
            reuse_port=workers > 1 or args.secondary,
            shutdown_timeout=config.server.shutdown_timeout,
            print=lambda _: say(
                f"broker process {os.getpid()} ready beside the first"
                if args.secondary
                else _ready_message(config, workers)
            ),
            access_log=None,
        )
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise
        if isinstance(exc, ListenError):  # the admin listener
            host, port, setting = exc.host, exc.port, exc.setting
            choose = f"[server] {setting} (BROKER_SERVER__{setting.upper()})"
        else:
            host, port = config.server.host, config.server.port
            choose = "--port or [server] port (BROKER_SERVER__PORT)"
        say(
            f"broker: cannot listen on {host}:{port}: {exc.strerror}. "
            f"Stop what holds the port, or choose another with {choose}"
        )
        return 2
    say("broker stopped")
    return 0


async def _reread_on_sighup(app: web.Application) -> None:
    """SIGHUP: every peer's token file is read again at its next use (a changed file is read
    again anyway; this covers a change its modification time does not show)."""

    def reread() -> None:
        forget_files()
        say("SIGHUP: peers' token files will be read again")

    with contextlib.suppress(NotImplementedError, AttributeError):  # no SIGHUP on Windows
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reread)


def _quiet_closing(record: logging.LogRecord) -> bool:
    return "closing of asynchronous generator" not in record.getMessage()


def preflight(config: Config) -> None:
    """What can be checked before anything starts, as ConfigError naming the key and the fix:
    home's token, and the sealing key (with ``[database] url``, one must be configured)."""
    config.home.bearer_token()
    if config.database.url is None and not config.propagation.secret_key_env:
        return  # a key made now in the data directory would stop initdb from making it
    load_box(
        config.propagation.secret_key_env,
        config.database.data_dir,
        key_file=config.propagation.secret_key_file,
        database_url=config.database.url,
    )


GC_THRESHOLDS = (20_000, 20, 20)
"""The cyclic garbage collector's thresholds while serving (CPython's default: 700, 10, 10)."""


async def settle_memory(_app: web.Application) -> None:
    """Once the application has started: what it holds for its lifetime (modules, schemas, the
    pools) is moved out of the collector's sight (``gc.freeze``), and the first generation
    collects after 20,000 net allocations instead of 700.

    A page of 100 users allocates a few thousand container objects (the parsed page's dicts and
    lists, the plan's tuples) that live for one request; with the defaults they set off several
    collections per page, some of them full ones that walk every object of the process: about 250 us of CPU per page request (measured with gc.callbacks,
    issue 15), 45 us with the freeze alone, none with both. Reference cycles are still
    collected: they add to the count until it reaches the threshold."""
    settle_collector()


def settle_collector() -> None:
    """:func:`settle_memory`'s work, for any process that serves as ``broker serve`` does (the
    benchmarks time the store under the same collector)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def worker_count(text: str) -> int:
    """``--workers``: a number of processes, or ``auto`` for one per core."""
    if text == "auto":
        return max(1, os.cpu_count() or 1)
    if not text.isdigit() or int(text) < 1:
        raise InvalidValueError(
            f"--workers {text!r}: give a number of processes (1 or more) or auto"
        )
    return int(text)


async def _secondaries(
    app: web.Application, *, config: Config, count: int, config_file: str | None
) -> AsyncIterator[None]:
    """The other processes of ``--workers N``, started once this one is up (its database and
    migrations ready), stopped with it. They share the port (SO_REUSEPORT) and the database."""
    env = {
        **os.environ,
        "BROKER_SERVER__HOST": config.server.host,
        "BROKER_SERVER__PORT": str(config.server.port),
        "BROKER_DATA_DIR": str(config.database.data_dir),
        **({"BROKER_CONFIG": config_file} if config_file else {}),
    }
    command = [
        sys.executable,
        "-m",
        "broker.cli",
        "serve",
        "--secondary",
        "--workers",
        str(count + 1),
    ]
    processes = [await asyncio.create_subprocess_exec(*command, env=env) for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), config.server.shutdown_timeout + 10)
            except TimeoutError:
                process.kill()
                await process.wait()


def _ready_message(config: Config, workers: int = 1) -> str:
    """What ``broker serve`` says once it listens: where, and what it serves."""
    processes = f", {workers} processes" if workers > 1 else ""
    return (
        f"broker {__version__} ready{processes}: {config.public_url} (/healthz, /readyz"
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
