"""Discovery through the broker: ``/ServiceProviderConfig``, ``/Schemas`` and ``/ResourceTypes``
(RFC 7644 section 4), with home's URLs moved to the broker's and nothing else asked of home."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiohttp import web

from broker.errors import NotFoundError
from broker.events.sets import service_provider_config_events
from broker.responses import SCIM_PREFIX

if TYPE_CHECKING:
    from broker.proxy.handlers import Call, Proxy


async def service_provider_config(proxy: Proxy, call: Call, request: web.Request) -> web.Response:
    response = await proxy.home.request("GET", "/ServiceProviderConfig")
    if response.status != 200 or not isinstance(response.body, dict):
        raise proxy.home_error(call, response, {})
    config = _relocate(proxy, response.body)
    # Domains authenticate to the broker, with its bearer tokens, not to home.
    config["authenticationSchemes"] = [
        {
            "type": "oauthbearertoken",
            "name": "Bearer token",
            "description": "A token the broker's operator issues with `broker token issue DOMAIN`",
            "primary": True,
        }
    ]
    home_bulk = config.get("bulk") if isinstance(config.get("bulk"), dict) else {}
    from broker.proxy.bulk import MAX_BULK_OPERATIONS
    from broker.responses import MAX_BODY

    config["bulk"] = {
        "supported": bool(home_bulk.get("supported")),
        "maxOperations": min(_int(home_bulk.get("maxOperations")), MAX_BULK_OPERATIONS),
        "maxPayloadSize": min(_int(home_bulk.get("maxPayloadSize")), MAX_BODY),
    }
    # The broker's own change notification (RFC 9967 section 4), not home's, shown to a
    # domain subscribed to it: clients that predate RFC 9967 refuse the attribute.
    config.pop("securityEvents", None)
    if await proxy.store.subscribed(call.domain.id):
        config.update(service_provider_config_events())
    return await proxy.respond(call, 200, config)


async def discovery(proxy: Proxy, call: Call, request: web.Request) -> web.Response:
    """``/Schemas`` and ``/ResourceTypes``, or one of them named by a known schema URN or
    resource-type name: nothing else is ever asked of home on this route."""
    collection = "Schemas" if request.path.startswith(SCIM_PREFIX + "/Schemas") else "ResourceTypes"
    path = f"/{collection}"
    if "id" in request.match_info:
        name = request.match_info["id"]
        known = (
            call.schema.schema_ids
            if collection == "Schemas"
            else {t.lower() for t in call.schema.attributes.by_type}
        )
        if name.lower() not in known:
            raise NotFoundError(f"no such {collection[:-1].lower()} {name!r}")
        path += "/" + quote(name, safe=":")
    response = await proxy.home.request("GET", path)
    if response.status != 200:
        raise proxy.home_error(call, response, {})
    return await proxy.respond(call, 200, _relocate(proxy, response.body))


def _relocate(proxy: Proxy, body: Any) -> Any:
    """Discovery documents with home's URLs moved to the broker's (they hold no IDs)."""
    return json.loads(
        json.dumps(body).replace(
            json.dumps(proxy.home.base_url)[1:-1], json.dumps(proxy.base)[1:-1]
        )
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
