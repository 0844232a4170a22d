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
    parts = []
    for n, operation in enumerate(operations):
        head = orjson.dumps({"method": operation.method, "path": operation.path, "bulkId": str(n)})
        if operation.data is not None:
            parts.append(head[:-1] + b',"data":' + operation.data + b"}")
        else:
            parts.append(head)
    return (
        b'{"schemas":["' + BULK_REQUEST.encode() + b'"],"Operations":[' + b",".join(parts) + b"]}"
    )


def operation_answers(body: Any, operations: Sequence[Operation]) -> list[Answer | None]:
    """Each operation's answer in a BulkResponse (``body``, parsed), in the order of
    ``operations``: found by its ``bulkId``, or else at its position; None for one the peer said
    nothing of. A created resource's ID is read from the operation's ``response`` or, as RFC
    7644 section 3.7.3 shows, from the last segment of its ``location``."""
    answers: list[Answer | None] = [None] * len(operations)
    results = body.get("Operations") if isinstance(body, dict) else None
    if not isinstance(results, list):
        return answers
    for position, result in enumerate(results):
        if not isinstance(result, dict):
            continue
        index = _index(result.get("bulkId"), position, len(operations))
        if index is None or answers[index] is not None:
            continue
        answers[index] = _answer(result, operations[index])
    return answers


def _index(bulk_id: Any, position: int, count: int) -> int | None:
    if isinstance(bulk_id, str):
        return int(bulk_id) if bulk_id.isdigit() and int(bulk_id) < count else None
    return position if position < count else None


def _answer(result: Mapping[str, Any], operation: Operation) -> Answer | None:
    status = result.get("status")
    try:
        code = int(status) if isinstance(status, (int, str)) else 0
    except ValueError:
        return None
    if not 100 <= code <= 599:
        return None
    location = result.get("location")
    headers = {"Location": location} if isinstance(location, str) else {}
    version = result.get("version")
    if isinstance(version, str):
        headers["ETag"] = version
    response = result.get("response")
    if response is None and operation.method == "POST" and code == 201:
        peer_id = _last_segment(location)
        response = {"id": peer_id} if peer_id else None
    return Answer(code, headers, response)


def _last_segment(location: Any) -> str | None:
    """The ID at the end of a created resource's ``location``; None when there is none, or when
    it would name another path once put back in one (``/``, ``?``, ``#``, ``.``, ``..``, a
    control character): the create then fails as one whose answer has no ID."""
    if not isinstance(location, str):
        return None
    segment = unquote(urlsplit(location).path.rstrip("/").rpartition("/")[2])
    if segment in ("", ".", "..") or any(c in "/?#" or ord(c) < 0x20 for c in segment):
        return None
    return segment
