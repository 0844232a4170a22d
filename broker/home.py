"""The home's SCIM service as the proxy sees it: its pooled keep-alive connections
(:class:`broker.origin.Origin`), the home's credential,
and what the home's ``/Schemas`` and ``/ResourceTypes`` say (refreshed every few minutes)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from broker.errors import BrokerError
from broker.http import SCIM_JSON, Answer, AnswerTooLarge, is_redirect
from broker.origin import Origin
from broker.scim.attributes import ResourceSchema, SchemaIndex
from broker.scim.rewrite import Endpoints
from broker.scim.schemas import DEFAULT_REFERENCES, ReferenceMap
from broker.scim.writeonly import DEFAULT_WRITE_ONLY

__all__ = [
    "MAX_ANSWER",
    "HomeClient",
    "HomeRefused",
    "HomeSchema",
    "HomeUnavailable",
    "readiness_problem",
]

log = logging.getLogger(__name__)
SEARCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
# Response headers the proxy reads (ETag is passed on; Location only tells that home created
# something); everything else stays here.
PASSED_HEADERS = ("ETag", "Location")
MAX_ANSWER = 16 << 20
"""The longest answer read from home by default ([home] max_answer_bytes): a page of a search."""


class HomeUnavailable(BrokerError):
    status = 502


class HomeRefused(Exception):
    """Home answered a query the broker makes for itself with an error."""

    def __init__(self, response: Answer) -> None:
        super().__init__(f"home answered HTTP {response.status}")
        self.response = response


@dataclass(frozen=True)
class HomeSchema:
    refs: ReferenceMap
    endpoints: Endpoints
    loaded_at: float
    write_only: frozenset[str] = DEFAULT_WRITE_ONLY
    """Attributes home never returns (``returned: never``), by name as its /Schemas spells them."""
    attributes: SchemaIndex = field(default_factory=SchemaIndex.default)
    """Every attribute of every resource type, for the canonical request and the policy."""
    schema_ids: frozenset[str] = frozenset()
    """The schema URNs home describes (lower-case): the only ``/Schemas/{id}`` a domain may ask."""

    def resource(self, resource_type: str) -> ResourceSchema:
        found = self.attributes.get(resource_type)
        if found is None:
            raise BrokerError(f"home describes no attributes for {resource_type}", status=502)
        return found


class HomeClient:
    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout: float = 30.0,
        schema_ttl: float = 300.0,
        limit: int = MAX_ANSWER,
    ) -> None:
        self.limit = limit
        """The longest answer read; a longer one is left unread (HomeUnavailable)."""
        self.base_url = base_url.rstrip("/")
        self._origin = Origin(self.base_url, timeout=timeout)
        self._sent = {"Accept": SCIM_JSON}
        if token:
            self._sent["Authorization"] = f"Bearer {token}"
        self.schema_ttl = schema_ttl
        self._schema: HomeSchema | None = None
        self._loading: asyncio.Task[HomeSchema] | None = None
        """The load of home's schema under way, which every caller meanwhile awaits."""

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """One call to home; HomeUnavailable when it cannot be reached or answers no JSON."""
        answer = await self._exchange(method, path, params=params, body=body, headers=headers)
        try:
            parsed = answer.json()
        except orjson.JSONDecodeError as exc:
            raise HomeUnavailable(
                "the home SCIM service answered something that is not JSON"
            ) from exc
        passed = {h: answer.headers[h] for h in PASSED_HEADERS if h in answer.headers}
        return Answer(answer.status, passed, parsed)

    async def forward(
        self, method: str, path: str, params: Mapping[str, str], data: bytes
    ) -> Answer:
        """A request passed to home as it came, with home's credential."""
        answer = await self._exchange(method, path, params=params, data=data)
        passed = {h: answer.headers[h] for h in PASSED_HEADERS if h in answer.headers}
        return Answer(
            answer.status,
            passed,
            answer.json_or_none(),
            raw=answer.raw,
            content_type=answer.content_type,
        )

    async def reachable(self) -> str | None:
        """Whether home serves SCIM with the broker's token (a GET of its
        /ServiceProviderConfig, as ``/readyz`` asks): None when it does, else what is wrong and
        what to check."""
        try:
            answer = await self._exchange("GET", "/ServiceProviderConfig")
        except HomeUnavailable as exc:
            return exc.detail
        return readiness_problem(answer.status, answer.json_or_none())

    async def close(self) -> None:
        """Close the idle connections to home (those in use close when their answer is read)."""
        await self._origin.close()

    async def __aenter__(self) -> HomeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _exchange(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """``body`` (serialised) or ``data`` (as it is) sent as SCIM JSON; a redirect is never
        followed (HomeUnavailable)."""
        sent = {**self._sent, **headers} if headers else self._sent
        if body is not None:
            data = orjson.dumps(body)
        if data:
            sent = {"Content-Type": SCIM_JSON, **sent}
        try:
            answer = await self._origin.exchange(
                method, path, headers=sent, params=params, data=data or None, limit=self.limit
            )
        except AnswerTooLarge as exc:
            log.warning(
                "home answered %s %s (HTTP %d) with more than %d bytes, left unread: raise "
                "[home] max_answer_bytes, or have home serve smaller pages",
                method,
                path,
                exc.status,
                exc.limit,
            )
            raise HomeUnavailable(
                f"the home SCIM service answered with more than {exc.limit} bytes, which the "
                "broker does not read; ask for fewer resources at once (count), or the "
                "operator raises [home] max_answer_bytes"
            ) from None
        except (OSError, TimeoutError) as exc:
            log.warning("home unreachable: %s %s: %r", method, path, exc)
            raise HomeUnavailable("the home SCIM service did not answer; try again later") from exc
        if is_redirect(answer.status):
            # Never followed: the request (and its credential, a password) stays here.
            log.warning(
                "home answered %s %s with HTTP %d to %r; redirects are not followed: set "
                "[home] scim_url to the address home serves at",
                method,
                path,
                answer.status,
                answer.headers.get("Location"),
            )
            raise HomeUnavailable(
                "the home SCIM service answered with a redirect, which the broker does not "
                "follow; the operator must correct [home] scim_url"
            )
        return answer

    async def ids_within(self, endpoint: str, ids: Sequence[str], scope: str | None) -> set[str]:
        """Which of ``ids`` home has at ``endpoint`` (and within the filter ``scope``): one search
        per 200 IDs. HomeRefused when home answers with an error."""
        found: set[str] = set()
        for start in range(0, len(ids), 200):
            chunk = ids[start : start + 200]
            named = " or ".join(f"id eq {json.dumps(i)}" for i in chunk)
            body = {
                "schemas": [SEARCH_SCHEMA],
                "filter": f"({named}) and ({scope})" if scope else named,
                "attributes": ["id"],
                "count": len(chunk),
            }
            response = await self.request("POST", endpoint + "/.search", body=body)
            if response.status != 200 or not isinstance(response.body, dict):
                raise HomeRefused(response)
            found.update(
                r["id"]
                for r in response.body.get("Resources", [])
                if isinstance(r, dict) and isinstance(r.get("id"), str)
            )
        return found

    async def read_back(self, written: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Home's current resources for ``written`` (internal ID -> resource type), after a
        write home answered without them; those it does not return are left out."""
        endpoints = (await self.schema()).endpoints
        found: dict[str, dict[str, Any]] = {}
        for internal_id, resource_type in written.items():
            endpoint = endpoints.by_type.get(resource_type)
            if endpoint is None:
                continue
            response = await self.request("GET", f"{endpoint}/{internal_id}")
            if response.status == 200 and isinstance(response.body, dict):
                found[internal_id] = response.body
        return found

    async def schema(self) -> HomeSchema:
        """Reference attributes and endpoints, from the home's own description of itself. One
        load at a time: the deliveries a claim starts together (dozens) await the same one
        instead of each reading /Schemas and /ResourceTypes and building the index."""
        now = time.monotonic()
        if self._schema is not None and now - self._schema.loaded_at < self.schema_ttl:
            return self._schema
        loading = self._loading
        if loading is None:
            loading = self._loading = asyncio.ensure_future(self._load_schema(now))
            loading.add_done_callback(self._loaded)
        return await asyncio.shield(loading)

    def _loaded(self, task: asyncio.Task[HomeSchema]) -> None:
        if self._loading is task:
            self._loading = None
        if not task.cancelled():
            task.exception()  # retrieved: its callers raise it themselves

    async def _load_schema(self, now: float) -> HomeSchema:
        try:
            schemas = await self.request("GET", "/Schemas")
            types = await self.request("GET", "/ResourceTypes")
            schema_list = _resources(schemas.body)
            type_list = _resources(types.body)
            refs = (
                ReferenceMap.from_schemas(schema_list, type_list)
                if schema_list
                else DEFAULT_REFERENCES
            )
            attributes = (
                SchemaIndex.from_schemas(schema_list, type_list)
                if schema_list and type_list
                else SchemaIndex.default()
            )
            if not schema_list:
                log.warning("home /Schemas unreadable: using the attributes RFC 7643 defines")
            self._schema = HomeSchema(
                refs,
                Endpoints.from_resource_types(type_list),
                now,
                _write_only(schema_list) if schema_list else DEFAULT_WRITE_ONLY,
                attributes,
                _schema_ids(schema_list, attributes),
            )
        except HomeUnavailable:
            if self._schema is not None:
                # Keep what we knew, for another TTL: an unreadable home is not asked again
                # on every request (issue 15).
                self._schema = dataclasses.replace(self._schema, loaded_at=now)
                return self._schema
            log.warning("home /Schemas unreadable: using the references RFC 7643 defines")
            attributes = SchemaIndex.default()
            # Kept like a good answer, so an unreachable home is not asked again per request.
            self._schema = HomeSchema(
                DEFAULT_REFERENCES,
                Endpoints.default(),
                now,
                attributes=attributes,
                schema_ids=_schema_ids([], attributes),
            )
        return self._schema


def readiness_problem(status: int, body: Any) -> str | None:
    """What home's answer to GET /ServiceProviderConfig says about its readiness (pure)."""
    if status == 200 and isinstance(body, dict):
        return None
    if status in (401, 403):
        return f"home refused the broker's token ({status}): check [home] token or token_env"
    if status == 404:
        return "home answers 404 at /ServiceProviderConfig: check [home] scim_url (the SCIM base)"
    return f"home answered HTTP {status} to GET /ServiceProviderConfig, not a SCIM document"


def _schema_ids(schemas: Sequence[Mapping[str, Any]], attributes: SchemaIndex) -> frozenset[str]:
    ids = {str(s["id"]).lower() for s in schemas if isinstance(s.get("id"), str)}
    for resource in attributes.by_type.values():
        ids.add(resource.core.lower())
        ids.update(resource.extensions)
    return frozenset(ids)


def _write_only(schemas: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    return frozenset(
        str(attr["name"])
        for schema in schemas
        for attr in schema.get("attributes", []) or []
        if isinstance(attr, Mapping) and attr.get("returned") == "never" and attr.get("name")
    )


def _resources(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, list):
        return [r for r in body if isinstance(r, dict)]
    if isinstance(body, dict) and isinstance(body.get("Resources"), list):
        return [r for r in body["Resources"] if isinstance(r, dict)]
    return []
