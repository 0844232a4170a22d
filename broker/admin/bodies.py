"""Reading the admin API's request bodies: JSON objects, required strings and lists, a split's
moves; bad input is an InvalidValueError (a SCIM 400 with the fix)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from broker.errors import InvalidValueError

__all__ = ["json_object", "split_moves", "text", "texts"]


def split_moves(new: Sequence[str], move: Any) -> dict[str, list[tuple[str, str]]]:
    """A split's rows to move, by new entity. ``{"DOMAIN": [EXTERNAL_ID, ...]}`` moves the rows
    to the first new entity; ``{"NEW_ID": {"DOMAIN": [EXTERNAL_ID, ...]}}`` names the entity."""
    moves: dict[str, list[tuple[str, str]]] = {entity: [] for entity in new}
    if not isinstance(move, Mapping):
        raise InvalidValueError('"move" is an object: {"DOMAIN": ["EXTERNAL_ID", ...]}')
    for key, value in move.items():
        target, rows = (key, value) if key in moves else (new[0], {key: value})
        if not isinstance(rows, Mapping):
            raise InvalidValueError(
                f'"move" of {key}: an object of domains to lists of external IDs'
            )
        for domain, external_ids in rows.items():
            if not isinstance(external_ids, list) or not all(
                isinstance(e, str) for e in external_ids
            ):
                raise InvalidValueError(
                    f'"move" of {domain}: a list of that domain\'s external IDs'
                )
            moves[target].extend((domain, e) for e in external_ids)
    return moves


async def json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise InvalidValueError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidValueError("the request body is a JSON object")
    return body


def text(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidValueError(f'"{key}" is required: a non-empty string')
    return value


def texts(body: Mapping[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidValueError(f'"{key}" is required: a non-empty list of internal IDs')
    return value
