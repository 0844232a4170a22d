"""SCIM Bulk (RFC 7644 section 3.7) toward a push peer that supports it: the writes that
deliveries send to one peer at the same time travel in one request, and each delivery gets its
own operation's answer back, as if it had sent its request alone.

Pure functions here (the request built, the answer read); the combining of calls lives in
``peer.PeerClient``. Each operation is the request a delivery would have sent: the same method,
the same path (the peer's endpoint and the peer's own ID), the same body, which the leak guard
checked before it was handed over. The envelope adds only an operation number as ``bulkId``
(RFC 7644 section 3.7: required for POST) and the BulkRequest schema: nothing of home's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

from broker.http import Answer

__all__ = [
    "BULK_REQUEST",
    "BulkFeatures",
    "Operation",
    "bulk_features",
    "bulk_request",
    "bulkable",
    "carried",
    "is_bulk_response",
    "operation_answers",
    "take",
]

BULK_REQUEST = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
BULK_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:BulkResponse"
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
"""The methods a Bulk operation may carry (RFC 7644 section 3.7)."""


@dataclass(frozen=True)
class BulkFeatures:
    """What a peer's ServiceProviderConfig says of Bulk, bounded by what the broker sends."""

    max_operations: int
    """Operations in one request: 0 or 1 means Bulk is not used."""
    max_payload: int
    """Bytes of one request's body."""

    @property
    def usable(self) -> bool:
        return self.max_operations > 1


NO_BULK = BulkFeatures(0, 0)


def bulk_features(config: Any, *, ceiling: int) -> BulkFeatures:
    """Bulk as a peer's ServiceProviderConfig (``config``, parsed JSON) describes it, at most
    ``ceiling`` operations a request (0: never). A peer that says nothing usable of its limits
    gets none."""
    if ceiling <= 1 or not isinstance(config, dict):
        return NO_BULK
    bulk = config.get("bulk")
    if not isinstance(bulk, dict) or bulk.get("supported") is not True:
        return NO_BULK
    operations, payload = bulk.get("maxOperations"), bulk.get("maxPayloadSize")
    if not isinstance(operations, int) or not isinstance(payload, int) or payload <= 0:
        return NO_BULK
    return BulkFeatures(min(operations, ceiling), payload)


@dataclass(frozen=True)
class Operation:
    """One delivery's request, as a Bulk operation."""

    method: str
    path: str
    """The peer's path below its base URL: ``/Users`` or ``/Users/PEER_ID``."""
    data: bytes | None
    """The body, serialised once (its size counts toward the request's)."""


_ENVELOPE = len(orjson.dumps({"schemas": [BULK_REQUEST], "Operations": []}))
_PER_OPERATION = 64
"""Bytes an operation adds besides its body and path (method, bulkId, keys, commas): a bound."""


def take(waiting: Sequence[Operation], features: BulkFeatures) -> int:
    """How many of the operations waiting, from the first, go in the next request: as many as
    the peer's maxOperations and maxPayloadSize allow, and always at least one (an operation
    too large for any Bulk request is sent alone by the caller)."""
    size = _ENVELOPE
    for n, operation in enumerate(waiting[: features.max_operations]):
        size += _PER_OPERATION + len(operation.path) + len(operation.data or b"")
        if size > features.max_payload:
            return max(n, 1)
    return min(len(waiting), features.max_operations)


def bulk_request(operations: Sequence[Operation]) -> bytes:
    """The body of a BulkRequest carrying ``operations`` in order, each numbered by its
    ``bulkId`` (its position); bodies are spliced in as serialised."""
    parts = [carried(n, operation) for n, operation in enumerate(operations)]
    return (
        b'{"schemas":["' + BULK_REQUEST.encode() + b'"],"Operations":[' + b",".join(parts) + b"]}"
    )


def carried(n: int, operation: Operation) -> bytes:
    """Operation ``n`` as a BulkRequest carries it (the leak guard reads each so)."""
    head = orjson.dumps({"method": operation.method, "path": operation.path, "bulkId": str(n)})
    if operation.data is None:
        return head
    return head[:-1] + b',"data":' + operation.data + b"}"


def bulkable(operation: Operation) -> bool:
    """Whether ``operation`` may travel in a Bulk request: not when its path or body holds
    ``bulkId:`` (in any case), which a peer reads there as a reference to another operation's
    created resource (RFC 7644 section 3.7.2; scim2-server replaces it, in any string value):
    home's value would reach the peer as another account's ID, or fail. Such a write goes as
    its own request, where the text is only text."""
    text = operation.path.encode() + (operation.data or b"")
    return _REFERENCE not in text.lower()


_REFERENCE = b"bulkid:"


def is_bulk_response(body: Any) -> bool:
    """Whether ``body`` (parsed JSON) is a BulkResponse: an object with a list of
    ``Operations`` and, if it names its schemas, the BulkResponse's among them."""
    if not isinstance(body, dict) or not isinstance(body.get("Operations"), list):
        return False
    schemas = body.get("schemas")
    return schemas is None or (isinstance(schemas, list) and BULK_RESPONSE in schemas)


def operation_answers(body: Any, operations: Sequence[Operation]) -> list[Answer | None]:
    """Each operation's answer in a BulkResponse (``body``, parsed), in the order of
    ``operations``; None for one the answer says nothing certain of (the delivery retries it).

    Every byte is the peer's, so an answer is an operation's only when nothing contradicts it:
    found by its ``bulkId`` exactly as sent (required for a POST, RFC 7644 section 3.7), or,
    without one, at its position (never for a POST); with the operation's ``method`` if it
    names one; a status of three digits from 200 to 599. An operation answered twice is
    answered by neither. A created resource's ID is read from the operation's ``response`` or,
    as section 3.7.3 shows, from the last segment of its ``location``; a location that names
    another resource type, or has a query, a fragment or a ``.`` or ``..`` segment, or that
    disagrees with the response, gives none. (The whole answer was read within the bound of
    every peer read.)"""
    results = body.get("Operations") if isinstance(body, dict) else None
    if not isinstance(results, list):
        return [None] * len(operations)
    numbers = {str(n): n for n in range(len(operations))}
    found: dict[int, Mapping[str, Any]] = {}
    twice: set[int] = set()
    for position, result in enumerate(results):
        if not isinstance(result, dict):
            continue
        index = _index(result, position, operations, numbers)
        if index is None:
            continue
        if index in found:
            twice.add(index)
        found[index] = result
    return [
        None if n in twice or n not in found else _answer(found[n], operation)
        for n, operation in enumerate(operations)
    ]


def _index(
    result: Mapping[str, Any],
    position: int,
    operations: Sequence[Operation],
    numbers: Mapping[str, int],
) -> int | None:
    """The operation ``result`` answers: by its bulkId, else by its position (not a POST)."""
    bulk_id = result.get("bulkId")
    if bulk_id is None:
        index = position if position < len(operations) else None
        if index is None or operations[index].method == "POST":
            return None
    elif not isinstance(bulk_id, str) or bulk_id not in numbers:
        return None
    else:
        index = numbers[bulk_id]
    method = result.get("method")
    if method is not None and (
        not isinstance(method, str) or method.upper() != operations[index].method
    ):
        return None
    return index


def _status(value: Any) -> int | None:
    """An operation's status: a number, or its three ASCII digits, from 200 to 599."""
    if isinstance(value, str) and len(value) == 3 and value.isascii() and value.isdigit():
        value = int(value)
    if type(value) is not int or not 200 <= value <= 599:
        return None
    return value


def _answer(result: Mapping[str, Any], operation: Operation) -> Answer | None:
    code = _status(result.get("status"))
    if code is None:
        return None
    response = result.get("response")
    location = result.get("location")
    headers = {"Location": location} if isinstance(location, str) else {}
    version = result.get("version")
    if isinstance(version, str):
        headers["ETag"] = version
    if operation.method == "POST" and code == 201:
        response = _created(response, location, operation.path)
    return Answer(code, headers, response)


def _created(response: Any, location: Any, endpoint: str) -> Any:
    """A create's answer with the ID the peer gave, when its ``response`` and ``location``
    agree on one (either may be absent, not both); None (no ID) otherwise."""
    given = response.get("id") if isinstance(response, dict) else None
    located = _last_segment(location, endpoint) if location is not None else None
    if location is not None and located is None:
        return None
    if given is None:
        return {"id": located} if located else response
    return response if located in (None, given) else None


def _last_segment(location: Any, endpoint: str) -> str | None:
    """The ID at the end of a created resource's ``location``, which names a resource of
    ``endpoint`` (``/Users``): None when it does not, or when it has a query or a fragment, a
    ``.`` or ``..`` segment, or an ID that would name another path once put back in one (``/``,
    ``?``, ``#``, ``.``, ``..``, a control character): the create then fails as one whose
    answer has no ID. The origin is not compared: a peer behind a proxy names its own address,
    and the ID is only ever sent back to this peer."""
    if not isinstance(location, str):
        return None
    parts = urlsplit(location)
    if parts.query or parts.fragment or "?" in location or "#" in location:
        return None
    segments = parts.path.split("/")
    if any(unquote(s) in (".", "..") for s in segments):
        return None
    parent, _, segment = parts.path.rpartition("/")
    if not parent.endswith(endpoint):  # the endpoint begins with "/": a whole segment
        return None
    segment = unquote(segment)
    if segment in ("", ".", "..") or any(c in "/?#" or ord(c) < 0x20 for c in segment):
        return None
    return segment
