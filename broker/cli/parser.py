"""The ``broker`` command's argument parser: global options, then each command group's own."""

from __future__ import annotations

import argparse
from pathlib import Path

from broker import __version__
from broker.cli import (
    audit,
    database,
    deliveries,
    demo,
    domains,
    events,
    history,
    mappings,
    operations,
    provision,
    reconcile,
    serve,
    tokens,
)

__all__ = ["build_parser"]

GROUPS = (
    demo,
    serve,
    domains,
    tokens,
    deliveries,
    mappings,
    operations,
    provision,
    reconcile,
    events,
    history,
    audit,
    database,
)
"""Each adds its commands with ``register(commands)``, in the order ``broker --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The parser; each command sets ``run`` (called with the configuration and the arguments)
    and ``asynchronous`` (whether ``run`` returns a coroutine)."""
    parser = argparse.ArgumentParser(
        prog="broker",
        description="Federated ID-mapping broker: SCIM 2.0 between identity domains, no internal ID exposed.",
    )
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML configuration file (also $BROKER_CONFIG)"
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        type=Path,
        help="data directory of the embedded PostgreSQL (also $BROKER_DATA_DIR)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(commands)
    return parser
