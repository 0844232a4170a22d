"""``broker token issue|list|revoke``: domains' bearer tokens."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from broker.cli.common import actor, pool, split_list
from broker.config import Config
from broker.output import say, table, when
from broker.tokens import TokenStore, parse_duration

if TYPE_CHECKING:
    from broker.cli.common import Commands

__all__ = ["cmd_token", "register"]


def register(commands: Commands) -> None:
    """``token`` and its actions."""
    token = commands.add_parser("token", help="issue, list and revoke domains' bearer tokens")
    token.set_defaults(run=cmd_token, asynchronous=True)
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    issue = actions.add_parser("issue", help="issue a token; prints it alone on stdout")
    issue.add_argument("domain")
    issue.add_argument(
        "--scopes",
        metavar="S,S",
        help="scim:read,scim:write (default: both); admin (the admin API) only for the home domain",
    )
    issue.add_argument(
        "--expires-in", metavar="DURATION", help="for example 90d, 12h (default: never)"
    )
    listing = actions.add_parser("list", help="list tokens (never the tokens themselves)")
    listing.add_argument("domain", nargs="?")
    revoke = actions.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("id", type=int)


async def cmd_token(config: Config, args: argparse.Namespace) -> int:
    async with pool(config) as database:
        tokens = TokenStore(database)
        if args.token_command == "issue":
            await _issue(tokens, args)
        elif args.token_command == "list":
            await _list(tokens, args.domain)
        else:
            info = await tokens.revoke(args.id, actor=actor())
            say(f"token {info.id} of {info.domain_id} revoked (takes effect within seconds)")
    return 0


async def _issue(tokens: TokenStore, args: argparse.Namespace) -> None:
    """The token alone on stdout; what it is for on stderr."""
    token, info = await tokens.issue(
        args.domain,
        scopes=split_list(args.scopes),
        expires_in=parse_duration(args.expires_in) if args.expires_in else None,
        actor=actor(),
    )
    expiry = info.expires_at.isoformat(timespec="seconds") if info.expires_at else "never"
    say(
        f"token {info.id} for {info.domain_id} ({', '.join(info.scopes)}; expires {expiry}). "
        "It is shown once and stored only as a hash:"
    )
    print(token)


async def _list(tokens: TokenStore, domain: str | None) -> None:
    rows = [
        (
            str(t.id),
            t.domain_id,
            t.prefix + "...",
            ",".join(t.scopes),
            when(t.expires_at, "never"),
            when(t.last_used_at, "never"),
            "revoked " + when(t.revoked_at, "") if t.revoked_at else "active",
        )
        for t in await tokens.list(domain)
    ]
    print(table(("id", "domain", "token", "scopes", "expires", "last used", "state"), rows))
