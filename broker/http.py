"""One SCIM exchange over a shared aiohttp session: the request the home client and the peer
client both make, with their own error policies on top."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

__all__ = ["SCIM_JSON", "SET_TYPE", "Exchange", "exchange"]

SCIM_JSON = "application/scim+json"
SET_TYPE = "application/secevent+jwt"
"""A Security Event Token (RFC 8417 section 2.3), as RFC 8935 pushes it."""


@dataclass(frozen=True)
class Exchange:
    status: int
    headers: Mapping[str, str]
    raw: bytes
    content_type: str

    def json(self) -> Any:
        """The body parsed, None when empty; orjson.JSONDecodeError when it is not JSON."""
        return orjson.loads(self.raw) if self.raw else None

    def json_or_none(self) -> Any:
        """The body parsed, or None when it is empty or not JSON."""
        try:
            return self.json()
        except orjson.JSONDecodeError:
            return None


async def exchange(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    auth: Mapping[str, str],
    params: Mapping[str, str] | None = None,
    body: Any = None,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Exchange:
    """``body`` (serialised) or ``data`` (as it is) sent as SCIM JSON unless ``headers`` name
    another Content-Type; aiohttp.ClientError or TimeoutError when there is no answer."""
    sent = {"Accept": SCIM_JSON, **auth, **(headers or {})}
    if body is not None:
        data = orjson.dumps(body)
    if data:
        sent.setdefault("Content-Type", SCIM_JSON)
    async with session.request(
        method, url, params=params, data=data or None, headers=sent
    ) as response:
        raw = await response.read()
        # The headers keep their case-insensitive lookup (a server may send "Etag").
        return Exchange(response.status, response.headers, raw, response.content_type)
