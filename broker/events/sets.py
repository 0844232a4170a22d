"""SCIM provisioning events (RFC 9967) as Security Event Token claims (RFC 8417).

Pure functions: what changed between two resource documents, whether a subscription cares, the
claims of the SET that says so, and the ServiceProviderConfig member that advertises the events.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal

import orjson

__all__ = [
    "EVENT_URIS",
    "SUPPORTED_EVENT_URIS",
    "Change",
    "Detail",
    "EventKind",
    "describe_change",
    "domain_txn",
    "envelope",
    "interesting",
    "service_provider_config_events",
    "set_claims",
]

Detail = Literal["notice", "full"]


class EventKind(StrEnum):
    """The SCIM provisioning events of RFC 9967 section 2.4."""

    CREATE = "create"
    PUT = "put"
    PATCH = "patch"
    DELETE = "delete"
    ACTIVATE = "activate"
    DEACTIVATE = "deactivate"


_PROV = "urn:ietf:params:scim:event:prov"

#: (kind, detail) -> event URI (RFC 9967 sections 2.4.1 to 2.4.6 and the registry of section 7.4).
#: delete, activate and deactivate carry no payload, so "notice" and "full" SHALL NOT qualify them.
EVENT_URIS: Mapping[tuple[EventKind, str], str] = MappingProxyType(
    {
        (EventKind.CREATE, "notice"): f"{_PROV}:create:notice",
        (EventKind.CREATE, "full"): f"{_PROV}:create:full",
        (EventKind.PATCH, "notice"): f"{_PROV}:patch:notice",
        (EventKind.PATCH, "full"): f"{_PROV}:patch:full",
        (EventKind.PUT, "notice"): f"{_PROV}:put:notice",
        (EventKind.PUT, "full"): f"{_PROV}:put:full",
        (EventKind.DELETE, "notice"): f"{_PROV}:delete",
        (EventKind.DELETE, "full"): f"{_PROV}:delete",
        (EventKind.ACTIVATE, "notice"): f"{_PROV}:activate",
        (EventKind.ACTIVATE, "full"): f"{_PROV}:activate",
        (EventKind.DEACTIVATE, "notice"): f"{_PROV}:deactivate",
        (EventKind.DEACTIVATE, "full"): f"{_PROV}:deactivate",
    }
)

#: Every event URI the broker can issue, each once, in registry order.
SUPPORTED_EVENT_URIS: tuple[str, ...] = tuple(dict.fromkeys(EVENT_URIS.values()))

# Kinds whose event carries "attributes" (notice) or "data" (full) (RFC 9967 section 2.4).
_WITH_PAYLOAD = frozenset({EventKind.CREATE, EventKind.PUT, EventKind.PATCH})
# Kinds a subscription always hears of, whatever attributes it named.
_ALWAYS_INTERESTING = frozenset(
    {EventKind.CREATE, EventKind.DELETE, EventKind.ACTIVATE, EventKind.DEACTIVATE}
)
# Never reported as changed: server-managed, or the resource's identity rather than its content.
_IGNORED = frozenset({"id", "meta", "schemas"})
_CORE_SCHEMA_PREFIX = "urn:ietf:params:scim:schemas:core:"
_ACTIVE = "active"


@dataclass(frozen=True)
class Change:
    """What happened to one resource, as the events of one SET will say it."""

    kinds: tuple[EventKind, ...]
    """Usually one; activate or deactivate may accompany put or patch, or stand alone."""
    attributes: tuple[str, ...]
    """Names of the attributes touched, sorted: top-level core names, extension attributes as
    ``urn:...:User:manager``; never ``id``, ``meta`` or ``schemas``. Empty for a delete."""


def describe_change(
    previous: Mapping[str, Any] | None,
    current: Mapping[str, Any] | None,
    hint: str | None,
) -> Change | None:
    """The change from ``previous`` (last recorded document) to ``current`` (home's document now).

    ``hint`` is the verb the home reported (``create``, ``put``, ``patch``, ``delete``), or None when
    a poller found the change. Unassigned, null and empty values are one state (RFC 7643 section
    2.5); attribute names compare case-insensitively and multi-valued attributes without regard to
    order. None when nothing but ``id``, ``meta`` or ``schemas`` changed.
    """
    if hint not in (None, "create", "put", "patch", "delete"):
        raise ValueError(
            f"unknown change hint {hint!r}: expected create, put, patch, delete or None"
        )
    if hint == "delete" or current is None:
        return Change(kinds=(EventKind.DELETE,), attributes=())
    after = _flatten(current)
    if previous is None:
        return Change(
            kinds=(EventKind.CREATE,), attributes=tuple(sorted(n for n, _ in after.values()))
        )
    before = _flatten(previous)
    changed = {
        key: (after.get(key) or before[key])[0]
        for key in before.keys() | after.keys()
        if _differs(before.get(key), after.get(key))
    }
    if not changed:
        return None
    kinds: list[EventKind] = []
    was_active, is_active = _is_active(before), _is_active(after)
    activation = (
        EventKind.ACTIVATE
        if is_active and not was_active
        else EventKind.DEACTIVATE
        if was_active and not is_active
        else None
    )
    if activation is None or changed.keys() != {_ACTIVE}:
        kinds.append(EventKind.PUT if hint == "put" else EventKind.PATCH)
    if activation is not None:
        kinds.append(activation)
    return Change(kinds=tuple(kinds), attributes=tuple(sorted(changed.values())))


def interesting(change: Change, attributes: Collection[str] | None) -> bool:
    """Whether a subscription to ``attributes`` (None: all) should hear of ``change``.

    Create, delete, activate and deactivate always are. Otherwise a changed attribute must match a
    named one, case-insensitively: ``name.familyName`` and ``emails[type eq "work"]`` name ``name``
    and ``emails``; a fully qualified core name (``urn:...:core:2.0:User:emails``) names ``emails``;
    an extension schema URN names all its attributes.
    """
    if attributes is None or _ALWAYS_INTERESTING.intersection(change.kinds):
        return True
    wanted = {_interest(name) for name in attributes}
    for name in change.attributes:
        key = name.lower()
        for want in wanted:
            if want == key or key.startswith(want + ":"):
                return True
            if want == "" and not key.startswith("urn:"):
                return True
    return False


def set_claims(
    *,
    issuer: str,
    audience: str,
    jti: str,
    txn: str,
    issued_at: int,
    uri: str,
    external_id: str | None,
    change: Change,
    detail: Detail,
    data: Mapping[str, Any] | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """The claims of the SET that reports ``change`` of the resource at ``uri`` to one audience.

    ``uri`` is the domain's relative resource path (``/Users/{id}``) and ``external_id`` that
    domain's ``externalId`` for it (RFC 9967 section 2.1). With ``detail="full"`` and ``data``
    (already in the domain's IDs) create, put and patch events carry ``data``; otherwise they carry
    ``attributes`` (section 2.4). ``version`` is the resource's ETag (section 2.2)
    as the domain sees it: sealed for it (``broker.scim.versions.present_etag``), never home's.
    """
    full = detail == "full" and data is not None
    sub_id: dict[str, Any] = {"format": "scim", "uri": uri}
    if external_id is not None:
        sub_id["externalId"] = external_id
    events: dict[str, Any] = {}
    for kind in change.kinds:
        payload: dict[str, Any] = {}
        if kind in _WITH_PAYLOAD:
            if full:
                payload["data"] = _plain(data)
            else:
                payload["attributes"] = list(change.attributes)
            if version is not None:
                payload["version"] = version
        events[EVENT_URIS[kind, "full" if full else "notice"]] = payload
    return envelope(
        issuer=issuer,
        audience=audience,
        jti=jti,
        txn=txn,
        issued_at=issued_at,
        sub_id=sub_id,
        events=events,
    )


def domain_txn(key: bytes, *, domain: str, txn: str) -> str:
    """The ``txn`` of one change in one domain's SETs (RFC 8417 section 2.2).

    The change's own txn is one for every domain; a domain's is an HMAC-SHA256 of it under the
    broker's txn key, written as a UUID like the change's: every SET of the change to that
    domain carries it (it still groups the SETs of one transaction), and no two domains get the
    same, so colluding domains cannot pair their SETs, and so their IDs, through it.
    """
    digest = hmac.new(key, f"{domain}\n{txn}".encode(), hashlib.sha256).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def envelope(
    *,
    issuer: str,
    audience: str,
    jti: str,
    txn: str,
    issued_at: int,
    sub_id: Mapping[str, Any],
    events: Mapping[str, Any],
) -> dict[str, Any]:
    """A SET's claims (RFC 8417 section 2.2, RFC 9967 section 2.1) around its ``events``."""
    return {
        "iss": issuer,
        "aud": audience,
        "jti": jti,
        "iat": issued_at,
        "txn": txn,
        "sub_id": dict(sub_id),
        "events": dict(events),
    }


def service_provider_config_events(
    *,
    event_uris: Iterable[str] = SUPPORTED_EVENT_URIS,
    async_request: Literal["none", "long", "request"] = "none",
) -> dict[str, Any]:
    """The ``securityEvents`` member of a ServiceProviderConfig (RFC 9967 section 4).

    ``eventUris`` lists the events the server can generate; ``asyncRequest`` says whether it
    completes requests asynchronously (section 2.5.1). Stream registration and configuration (push
    endpoint, poll endpoint, keys) are out of the RFC's scope and have no member here.
    """
    return {
        "securityEvents": {
            "asyncRequest": async_request,
            "eventUris": list(dict.fromkeys(event_uris)),
        }
    }


# A flattened document: lower-cased attribute name -> (name as written, value).
_Flat = dict[str, tuple[str, Any]]


def _flatten(document: Mapping[str, Any]) -> _Flat:
    """Top-level attributes of ``document``; extension attributes one by one under their full name."""
    flat: _Flat = {}
    for name, value in document.items():
        if name.lower() in _IGNORED or _unassigned(value):
            continue
        if name.lower().startswith("urn:") and isinstance(value, Mapping):
            core = name.lower().startswith(_CORE_SCHEMA_PREFIX)
            for sub_name, sub_value in value.items():
                if _unassigned(sub_value) or (core and sub_name.lower() in _IGNORED):
                    continue
                full_name = sub_name if core else f"{name}:{sub_name}"
                flat[full_name.lower()] = (full_name, sub_value)
        else:
            flat[name.lower()] = (name, value)
    return flat


def _differs(before: tuple[str, Any] | None, after: tuple[str, Any] | None) -> bool:
    if before is None or after is None:
        return before is not after
    # Equal as received is the common case, and cheap; only unequal values pay for canonical form.
    return before[1] != after[1] and _canonical(before[1]) != _canonical(after[1])


def _is_active(flat: _Flat) -> bool:
    entry = flat.get(_ACTIVE)
    return entry is not None and entry[1] is True


def _unassigned(value: Any) -> bool:
    """Null, an empty array or a complex value with nothing assigned: the same state as absent
    (RFC 7643 section 2.5)."""
    if value is None:
        return True
    if isinstance(value, Mapping):
        return all(_unassigned(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return all(_unassigned(item) for item in value)
    return False


def _canonical(value: Any) -> bytes:
    """A comparison key: names lower-cased, arrays unordered (RFC 7643 section 2.4), nulls dropped."""
    return orjson.dumps(_normalise(value), option=orjson.OPT_SORT_KEYS)


def _normalise(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            str(key).lower(): _normalise(item)
            for key, item in value.items()
            if not _unassigned(item)
        }
    if isinstance(value, (list, tuple)):
        # Each element by its canonical text, so that order does not count.
        return sorted(_canonical(item).decode() for item in value if not _unassigned(item))
    return value


def _plain(value: Any) -> Any:
    """A JSON-ready copy of ``value``: mappings become dicts, tuples lists."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _interest(name: str) -> str:
    """A subscription's attribute name reduced to what a Change names, lower-cased.

    The empty string stands for a whole core schema (all core attributes).
    """
    base = name.strip().lower().split("[", 1)[0]
    if not base.startswith("urn:"):
        return base.split(".", 1)[0]
    if base.startswith(_CORE_SCHEMA_PREFIX) and base.count(":") == 7:
        return ""  # "urn:ietf:params:scim:schemas:core:2.0:User" alone
    schema, _, attribute = base.rpartition(":")
    top = attribute.split(".", 1)[0]
    if schema.startswith(_CORE_SCHEMA_PREFIX):
        return top
    return f"{schema}:{top}"
