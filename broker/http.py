"""One SCIM exchange over a shared aiohttp session: the request the home client and the peer
client both make, with their own error policies on top.

Outbound calls never follow a redirect (DESIGN section 8): a 3xx is returned as it came, and the
caller treats it as a failure. Following one would re-send the request (a create with its password,
a SET) to wherever a domain's server points. The URLs the broker calls out to are checked by
:func:`outbound_url_problem` wherever they enter (configuration, ``domain add``, ``events
subscribe``) and again at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

__all__ = [
    "SCIM_JSON",
    "SET_TYPE",
    "Answer",
    "AnswerTooLarge",
    "exchange",
    "is_redirect",
    "outbound_url_problem",
]

SCIM_JSON = "application/scim+json"
SET_TYPE = "application/secevent+jwt"
"""A Security Event Token (RFC 8417 section 2.3), as RFC 8935 pushes it."""


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, whoever gave it (home, a push peer, a SET receiver): the one type for it."""

    status: int
    headers: Mapping[str, str]
    body: Any = None
    """The body parsed, where the receiver has parsed it (None: empty, not JSON, or not yet)."""
    raw: bytes = b""
    content_type: str = ""

    def json(self) -> Any:
        """The body parsed, None when empty; orjson.JSONDecodeError when it is not JSON."""
        return orjson.loads(self.raw) if self.raw else None

    def json_or_none(self) -> Any:
        """The body parsed, or None when it is empty or not JSON."""
        try:
            return self.json()
        except orjson.JSONDecodeError:
            return None


class AnswerTooLarge(aiohttp.ClientError):
    """The answer's body is longer than the caller's ``limit``: it was not read to its end.
    ``status`` and ``headers`` are the answer's (its status line came before the body)."""

    def __init__(
        self, limit: int, status: int = 0, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"the answer is larger than {limit} bytes")
        self.limit = limit
        self.status = status
        self.headers: Mapping[str, str] = headers if headers is not None else {}


async def _bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or AnswerTooLarge as soon as it is longer than ``limit`` (never read whole)."""
    length = response.content_length
    if length is not None:
        if length > limit:
            raise AnswerTooLarge(limit, response.status, response.headers)
        # aiohttp's parser reads no more than Content-Length says: the bound holds (issue 15:
        # one read, not an iterator over chunks).
        return await response.read()
    raw = bytearray()
    async for chunk in response.content.iter_chunked(65536):
        raw += chunk
        if len(raw) > limit:
            raise AnswerTooLarge(limit, response.status, response.headers)
    return bytes(raw)


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
    limit: int | None = None,
) -> Answer:
    """``body`` (serialised) or ``data`` (as it is) sent as SCIM JSON unless ``headers`` name
        another Content-Type; aiohttp.ClientError or TimeoutError when there is no answer. A
        redirect is never followed: the 3xx is the answer (:func:`is_redirect`). With ``limit``, a body
    longer than that many bytes is AnswerTooLarge (an aiohttp.ClientError)."""
    sent = {"Accept": SCIM_JSON, **auth, **(headers or {})}
    if body is not None:
        data = orjson.dumps(body)
    if data:
        sent.setdefault("Content-Type", SCIM_JSON)
    async with session.request(
        method, url, params=params, data=data or None, headers=sent, allow_redirects=False
    ) as response:
        raw = await response.read() if limit is None else await _bounded(response, limit)
        # The headers keep their case-insensitive lookup (a server may send "Etag").
        return Answer(
            response.status, response.headers, raw=raw, content_type=response.content_type
        )


def is_redirect(status: int) -> bool:
    """Whether ``status`` asks the client to go elsewhere (RFC 9110 section 15.4); 304 Not
    Modified is an answer, not a redirect."""
    return 300 <= status < 400 and status != 304


def outbound_url_problem(url: str, *, query: bool = False) -> str | None:
    """What is wrong with ``url`` as an address the broker calls out to (a SCIM base URL, a SET
    receiver), in words that say what to fix; None when it is fine.

    It is ``http`` or ``https`` with a host; no userinfo (a credential goes in a variable named
    by ``--token-env``, never in a URL that is shown and logged), no fragment, no whitespace or
    control character. A query string is refused unless ``query``: the broker appends SCIM paths
    to a base URL, which a query would swallow."""
    if not url or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "is empty or holds whitespace or a control character"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return f"must be an http:// or https:// URL, not {parts.scheme or 'a relative one'}"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return (
            "must not carry a user or password before the host: give the credential with "
            "--token-env (or [home] token_env) instead"
        )
    if not parts.hostname:
        return "has no host: write it as https://HOST[:PORT]/PATH"
    if port == 0:
        return "has port 0: name the port the server listens on"
    if "#" in url:
        return "must not have a #fragment: remove it"
    if "?" in url and not query:
        return "must not have a ?query: the broker appends SCIM paths to it; remove it"
    return None
