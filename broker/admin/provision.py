"""``POST {admin}/admin/provision``: provisioning on demand (RFC 7642 section 2.3.4).

The body is ``{"domain": "P1", "entity": "INTERNAL_ID"}`` (or ``"entity": "DOMAIN:EXTERNAL_ID"``);
the answer is the peer's ID: 201 when the account was created now, 200 when it existed already.
Needs a token with the ``admin`` scope."""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from broker.errors import InvalidValueError
from broker.propagation.ondemand import provision

if TYPE_CHECKING:
    from broker.admin.api import Admin

__all__ = ["register"]

MAX_WAIT = 60.0
"""Seconds a caller may ask the answer to wait for (``"wait"``), at most."""


def register(app: web.Application, admin: Admin) -> None:
    """Add ``POST /admin/provision`` to the admin listener."""
    app.router.add_post("/admin/provision", functools.partial(_provision, admin))


async def _provision(admin: Admin, request: web.Request) -> web.Response:
    await admin.authorize(request)
    body = await request.json(loads=_loads)
    if not isinstance(body, dict):
        raise InvalidValueError('the body is {"domain": "PEER", "entity": "ID or DOMAIN:ID"}')
    domain, entity, wait = body.get("domain"), body.get("entity"), body.get("wait", 30)
    for key, value in (("domain", domain), ("entity", entity)):
        if not isinstance(value, str) or not value:
            raise InvalidValueError(f'"{key}" is required: a non-empty string')
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= MAX_WAIT:
        raise InvalidValueError(f'"wait" is a number of seconds from 0 to {MAX_WAIT:g}')
    assert isinstance(domain, str) and isinstance(entity, str)
    done = await provision(admin.pool, domain=domain, entity=entity, wait=float(wait))
    document = {
        "domain": done.domain,
        "entity": done.internal_id,
        "id": done.external_id,
        "created": done.created,
    }
    return web.json_response(document, status=201 if done.created else 200)


def _loads(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise InvalidValueError("the request body is not JSON") from None
