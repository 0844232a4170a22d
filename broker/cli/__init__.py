"""The ``broker`` command: ``main`` parses the arguments, runs the command, and turns what went
wrong into a message on stderr and an exit status (1: the command was refused; 2: configuration
or database; 130: interrupted).

Each command group is a module of this package (``serve``, ``domains``, ``tokens``,
``deliveries``, ``mappings``, ``operations``, ``events``, ``history``, ``audit``, ``demo``);
``parser`` gathers them and ``output`` is what they all print with.
"""

from __future__ import annotations

import argparse
import asyncio
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from broker.cli.parser import build_parser
from broker.config import Config, ConfigError, load_config
from broker.db import MigrationError
from broker.errors import BrokerError
from broker.output import say

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``broker ARGV``; the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "idempotency_key", "") is None:
        args.idempotency_key = str(uuid.uuid4())
    config: Config | None = None
    try:
        config = load_config(args.config)
        if args.data_dir is not None:
            config.database.data_dir = args.data_dir
        return _run(config, args)
    except (ConfigError, MigrationError) as exc:
        _traceback_if_asked(args)
        say(f"broker: {exc}")
        return 2
    except BrokerError as exc:
        say(f"broker: {exc.detail}")
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        _traceback_if_asked(args)
        say(_unreachable(config, exc))
        return 2
    except KeyboardInterrupt:
        return 130


def _traceback_if_asked(args: argparse.Namespace) -> None:
    """``--debug`` (``broker serve``): the traceback before the one line."""
    if getattr(args, "debug", False):
        traceback.print_exc()


def _run(config: Config, args: argparse.Namespace) -> int:
    run: Callable[[Config, argparse.Namespace], Any] = args.run
    if args.asynchronous:
        coroutine: Awaitable[int] = run(config, args)
        return asyncio.run(coroutine)  # type: ignore[arg-type]
    return int(run(config, args))


def _unreachable(config: Config | None, exc: Exception) -> str:
    """What to check when the database could not be started or reached."""
    if config is not None and config.database.url is None:
        return (
            f"broker: the embedded PostgreSQL in {config.database.data_dir} could not start "
            f"or be reached: {exc}. Check that directory (--data-dir, BROKER_DATA_DIR), or "
            "use a server of your own: [database] url (BROKER_DATABASE_URL)."
        )
    return (
        f"broker: the database is not reachable: {exc}. Check [database] url (BROKER_DATABASE_URL)."
    )
