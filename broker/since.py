"""``--since T`` (and ``?since=T``): a moment given as ISO 8601 or as a time ago (``90s``,
``30m``, ``2h``, ``7d``). Pure: the clock is a parameter."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from broker.errors import InvalidValueError

__all__ = ["parse_since"]

_AGO = re.compile(r"^(\d{1,9})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_HELP = "give an ISO 8601 time (2026-12-05T10:00:00Z) or a time ago (90s, 30m, 2h, 7d)"


def parse_since(text: str, now: datetime) -> datetime:
    """The moment ``text`` names, as an aware UTC datetime (a time without a zone is UTC);
    InvalidValueError naming the forms understood, or when it lies after ``now``."""
    value = text.strip()
    ago = _AGO.match(value)
    if ago:
        moment = now - timedelta(seconds=int(ago.group(1)) * _UNITS[ago.group(2)])
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidValueError(f"since {text!r} is not a time: {_HELP}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    if moment > now:
        raise InvalidValueError(f"since {text!r} is in the future: {_HELP}")
    return moment.astimezone(UTC)
