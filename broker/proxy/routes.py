"""The domain-facing SCIM routes (RFC 7644 section 3.2): each served by :meth:`Proxy.serve`,
which authenticates the domain, then hands the request to the module that serves it."""

from __future__ import annotations

from aiohttp import web

from broker.proxy import bulk, discovery, reads, writes
from broker.proxy.handlers import Proxy
from broker.responses import SCIM_PREFIX

__all__ = ["routes"]


def routes(proxy: Proxy) -> list[web.RouteDef]:
    """Every route under ``/scim/v2``; nothing else is served there."""
    p = SCIM_PREFIX
    serve = proxy.serve
    return [
        web.get(
            p + "/ServiceProviderConfig", serve("scim:read", discovery.service_provider_config)
        ),
        web.get(p + "/Schemas", serve("scim:read", discovery.discovery)),
        web.get(p + "/Schemas/{id}", serve("scim:read", discovery.discovery)),
        web.get(p + "/ResourceTypes", serve("scim:read", discovery.discovery)),
        web.get(p + "/ResourceTypes/{id}", serve("scim:read", discovery.discovery)),
        web.post(p + "/Bulk", serve("scim:write", bulk.serve_bulk)),
        web.post(p + "/.search", serve("scim:read", reads.search)),
        web.get(p + "/{endpoint}", serve("scim:read", reads.list_resources)),
        web.post(p + "/{endpoint}/.search", serve("scim:read", reads.search)),
        web.post(p + "/{endpoint}", serve("scim:write", writes.create)),
        web.get(p + "/{endpoint}/{id}", serve("scim:read", reads.get)),
        web.put(p + "/{endpoint}/{id}", serve("scim:write", writes.replace)),
        web.patch(p + "/{endpoint}/{id}", serve("scim:write", writes.patch)),
        web.delete(p + "/{endpoint}/{id}", serve("scim:write", writes.delete)),
    ]
