"""``broker demo``: its options here; the demo itself (``broker/demo.py``, which runs scim2-server
processes) is imported only when the command runs."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from broker import DEMO_INSTALL_HINT
from broker.config import Config

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["cmd_demo", "register"]


def register(commands: Commands) -> None:
    """``demo``."""
    demo = commands.add_parser(
        "demo",
        help="seed 002's merge and split, live: embedded PostgreSQL, a home, two peers, the broker",
        description="Start an embedded PostgreSQL, a home and two peers (scim2-server) and the "
        "broker, in a temporary directory; provision a few people; walk through seed 002's "
        "false positive (split) and false negative (merge), showing the mapping table and what "
        "each peer holds. Needs scim2-server: " + DEMO_INSTALL_HINT,
    )
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the federation up afterwards and print the URLs and tokens to try with curl",
    )
    demo.set_defaults(run=cmd_demo, asynchronous=True)


def cmd_demo(config: Config, args: argparse.Namespace) -> Awaitable[int]:
    # The user's configuration and data directory are left alone: the demo brings its own.
    from broker.demo import run_demo  # here, so that no other command loads the demo

    logging.basicConfig(
        level=logging.WARNING, format="    (broker log) %(levelname)s %(name)s: %(message)s"
    )
    return run_demo(args.keep_running, None)
