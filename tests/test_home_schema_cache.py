"""Issue 15: a home whose ``/Schemas`` answers 404, or something that is not JSON, is not asked
again on every request: the fallback (RFC 7643's attributes, or what was known before) is kept
for the schema TTL like a good answer. A real aiohttp home that counts what reaches it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.home import HomeClient
from broker.scim.schemas import DEFAULT_REFERENCES

RESOURCE_TYPES = {
    "Resources": [
        {
            "name": "User",
            "endpoint": "/Users",
            "schema": "urn:ietf:params:scim:schemas:core:2.0:User",
        }
    ]
}


class Home:
    def __init__(self) -> None:
        self.asked: Counter[str] = Counter()
        self.mode = "404 json"

    async def handle(self, request: web.Request) -> web.Response:
        self.asked[request.path] += 1
        if request.path.endswith("/ResourceTypes"):
            return web.json_response(RESOURCE_TYPES)
        if self.mode == "good":
            return web.json_response({"Resources": []})
        if self.mode == "404 json":
            return web.json_response({"status": "404"}, status=404)
        if self.mode == "404 text":
            return web.Response(status=404, text="Not Found")
        return web.Response(status=200, text="<html>maintenance</html>", content_type="text/html")


@asynccontextmanager
async def home_server() -> AsyncIterator[tuple[Home, str]]:
    home = Home()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", home.handle)
    server = TestServer(app)
    await server.start_server()
    try:
        yield home, str(server.make_url("/v2"))
    finally:
        await server.close()


@pytest.mark.parametrize("mode", ["404 json", "404 text", "200 not json"])
async def test_an_unreadable_schemas_is_read_once_per_ttl(mode: str) -> None:
    async with home_server() as (home, url), HomeClient(url, "t", schema_ttl=300) as client:
        home.mode = mode
        for _ in range(20):
            schema = await client.schema()
        assert schema.refs == DEFAULT_REFERENCES
        assert home.asked["/v2/Schemas"] == 1


async def test_a_home_that_stops_answering_json_is_not_asked_on_every_request() -> None:
    async with home_server() as (home, url), HomeClient(url, "t", schema_ttl=300) as client:
        home.mode = "good"
        known = await client.schema()
        assert home.asked["/v2/Schemas"] == 1
        # The TTL has run out (moved back rather than waited for), and home now answers HTML.
        assert client._schema is not None
        client._schema = dataclasses.replace(client._schema, loaded_at=known.loaded_at - 301)
        home.mode = "200 not json"
        for _ in range(20):
            schema = await client.schema()
        assert schema.refs == known.refs and schema.endpoints == known.endpoints
        assert home.asked["/v2/Schemas"] == 2, "what was known is kept for the TTL again"


@pytest.mark.parametrize("mode", ["good", "404 json"])
async def test_callers_that_ask_together_share_one_load(mode: str) -> None:
    """The deliveries a claim starts together (dozens) ask for the schema at once: one load of
    /Schemas and /ResourceTypes serves them all, whatever home answers."""
    async with home_server() as (home, url), HomeClient(url, "t", schema_ttl=300) as client:
        home.mode = mode
        schemas = await asyncio.gather(*(client.schema() for _ in range(30)))
        assert all(s is schemas[0] for s in schemas)
        assert home.asked["/v2/Schemas"] == 1
        assert home.asked["/v2/ResourceTypes"] == 1
