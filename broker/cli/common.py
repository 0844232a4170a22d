"""What the commands share besides their output: the database, who acts, comma lists."""

from __future__ import annotations

import argparse
import getpass
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import asyncpg

from broker.config import Config
from broker.db import migrated_pool
from broker.output import say
from broker.secrets import SecretBox, check_key, key_source, load_box

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]
    """The parser's subparsers, where each command group adds its commands."""

__all__ = ["actor", "checked_box", "pool", "split_list"]


@asynccontextmanager
async def pool(config: Config) -> AsyncIterator[asyncpg.Pool]:
    """A migrated database for one CLI command (joining a running embedded server if there is one)."""
    if config.database.url is None:
        say(f"using the embedded PostgreSQL in {config.database.data_dir}")
    async with migrated_pool(
        config.database.url,
        config.database.data_dir,
        max_size=2,
        on_applied=lambda m: say(f"applied migration {m.name}"),
    ) as (database, _url):
        yield database


def actor() -> str:
    """Who the audit log and the operations name as acting: the person at the terminal."""
    return f"cli:{getpass.getuser()}"


def split_list(value: str | None) -> list[str] | None:
    """``A, B`` as ``["A", "B"]``; None stays None (the option was not given)."""
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


async def checked_box(config: Config, database: asyncpg.Pool) -> SecretBox:
    """The key as ``broker serve`` loads it, refused when it is not the database's."""
    propagation, data_dir = config.propagation, config.database.data_dir
    box = load_box(
        propagation.secret_key_env,
        data_dir,
        key_file=propagation.secret_key_file,
        database_url=config.database.url,
    )
    source = key_source(propagation.secret_key_env, propagation.secret_key_file, data_dir)
    await check_key(database, box, source)
    return box
