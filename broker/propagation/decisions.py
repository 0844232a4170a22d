"""What the delivery worker decides between fetching and acting, as pure functions: how many rows
a peer's lane may claim, when the peers are read again, what a peer's answer to a create means
(created, link, refused), how long a 409 is retried, whether an account is suspended, kept
suspended or deleted, which request brings a peer's copy to home's state, how a merge's moved
memberships read, what a pushed SET's receiver said. No I/O and no clock: the time is an argument.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from broker.propagation.documents import PATCH_SCHEMA, scim_patch
from broker.propagation.policy import Failure, Verdict

__all__ = [
    "BULK_DEPTH",
    "BULK_ROOM_PAYLOAD",
    "DELETED",
    "SUSPEND_PATCH",
    "UNIQUE_BY",
    "Created",
    "Delete",
    "DropPending",
    "Link",
    "References",
    "Refused",
    "Row",
    "SetRefused",
    "Suspend",
    "UpdatePlan",
    "WaitSuspended",
    "claim_room",
    "copy_outcome",
    "create_answer",
    "deprovision_step",
    "follow_move",
    "health_due",
    "in_scope",
    "link_target",
    "membership_move",
    "park",
    "patient",
    "peers_reread",
    "plan_update",
    "ride_room",
    "set_answer",
    "sort_references",
    "sync_skipped",
    "unique_value",
    "users_to_scope",
]

UNIQUE_BY = {"User": "userName", "Group": "displayName"}
"""A resource a peer refuses as a duplicate is looked up by the attribute that must be unique."""

DELETED = frozenset({200, 204, 404})
"""A DELETE (or a PATCH of what may be gone) answered so has done its part."""

PEERS_TTL = 1.0
"""Seconds the list of peers is kept while nothing was enqueued."""
PEERS_TTL_ENQUEUED = 0.05
"""Seconds it is kept at least after an enqueue (which may be the first for a new peer)."""
HEALTH_EVERY = 1.0
"""Seconds between two reports of a peer's health while nothing fails."""


# ------------------------------------------------------------------ lanes


BULK_DEPTH = 4
"""Rounds of ``concurrency`` deliveries a lane holds under way toward a peer that takes SCIM
Bulk (2 toward one that does not): the deliveries waiting for its request slots then go
together, several a request. Twice as many under way made the outbox drain 23 to 27% faster
toward five in-memory peers (issue 15), with the same ``concurrency`` requests in flight;
twice as many taken along (``ride_room``) about 4% more."""
BULK_ROOM_PAYLOAD = 1 << 20
"""The smallest Bulk payload (``maxPayloadSize``, bytes) for which a lane holds ``BULK_DEPTH``
rounds: 1 MiB (RFC 7643's example, scim2-server's own), room for two writes a request unless
one is larger than 512 KiB. A write too large for the request goes alone; were the lane full of
such writes while the peer took all of ``peer_timeout`` for each, a claim could outlive its
lease: its row is claimed again, and applies nothing twice (every effect is idempotent)."""


def claim_room(
    *,
    concurrency: int,
    active: int,
    quarantined: bool,
    paused_until: float,
    now: float,
    bulk: bool = False,
) -> int:
    """How many rows a peer's lane claims now (0: none). Up to twice ``concurrency``
    deliveries are under way per peer, ``BULK_DEPTH`` times ``concurrency`` toward a peer that
    takes Bulk (``bulk``); a quarantined peer gets one probe at a time; a lane claims again once
    a round's worth has finished (at most ``depth - 1`` rounds under way); a paused lane rests.

    The lease bounds the depth: with the ``concurrency`` more taken along (``ride_room``), at
    most three rounds of ``peer_timeout`` (30 s) may wait for the peer's slots within a claim's
    lease (120 s). Without Bulk that is three times ``concurrency`` deliveries, one a request;
    toward a peer that takes Bulk, six times ``concurrency`` (twice as many taken along) go in
    requests of two writes or more (``BULK_ROOM_PAYLOAD``): three rounds at most."""
    depth = BULK_DEPTH if bulk else 2
    room = depth * concurrency - active
    if quarantined:
        room = min(room, 1 - active)
    elif active > (depth - 1) * concurrency:
        return 0
    if room <= 0 or paused_until > now:
        return 0
    return room


def ride_room(
    *,
    concurrency: int,
    riding: int,
    quarantined: bool,
    paused_until: float,
    now: float,
    bulk: bool = False,
) -> int:
    """How many deliveries a peer's lane takes along (0: none) when other lanes claim changes
    that are due toward it too: up to ``concurrency`` besides its own claims, twice that toward a
    peer that takes Bulk (``bulk``: its lane holds ``BULK_DEPTH`` rounds of its own, and takes
    more along so that the lanes drift apart less), so that one read of home serves a change
    toward every peer. A quarantined or resting lane takes none. Counted
    apart from ``claim_room``: a lane always claims its own oldest rows as well, so a slow
    peer's queue is never starved by what the faster lanes take it along to (``claim_room``
    says how many may wait for the peer's slots within a claim's lease)."""
    if quarantined or paused_until > now:
        return 0
    return max(0, (2 if bulk else 1) * concurrency - riding)


def peers_reread(*, now: float, read_at: float, enqueued: bool) -> float | None:
    """When the list of peers is read again: 0 (now), a delay (an enqueue came too soon after the
    last read: look once ``PEERS_TTL_ENQUEUED`` is over), or None (the list read is fresh)."""
    age = now - read_at
    if age >= PEERS_TTL or (enqueued and age >= PEERS_TTL_ENQUEUED):
        return 0.0
    if enqueued:
        return read_at + PEERS_TTL_ENQUEUED - now
    return None


def health_due(*, now: float, healthy_at: float) -> bool:
    """Whether a success tells the database the peer is healthy (at most once a second)."""
    return now - healthy_at >= HEALTH_EVERY


# ------------------------------------------------------------------ a sync


def sync_skipped(*, kind: str, state: str, provision_on_demand: bool, known_here: bool) -> bool:
    """Whether a sync has nothing to do: the entity was merged (the merge's own deliveries clean
    up after the alias), or it is a split-off held back until something needs it in the peer."""
    if state == "merged":
        return True
    return kind == "sync" and bool(provision_on_demand) and not known_here


def users_to_scope(named: Mapping[str, str | None]) -> list[str]:
    """The referenced entities a peer's scope filter applies to (users, or of unknown type)."""
    return [i for i, t in named.items() if t in (None, "User")]


def in_scope(named: Mapping[str, str | None], within: Iterable[str]) -> dict[str, str | None]:
    """The referenced entities left once those outside the peer's scope are dropped."""
    inside = set(within)
    return {i: t for i, t in named.items() if t not in (None, "User") or i in inside}


class Row(Protocol):
    """A row as the database returns it (an ``asyncpg.Record``, or a dict in a test)."""

    def __getitem__(self, key: str, /) -> Any: ...


@dataclass(frozen=True)
class References:
    """The peer's accounts of what a resource refers to."""

    views: dict[str, str]
    """Entity -> the peer's ID, for those the peer holds."""
    waiting: list[str]
    """Entities whose delivery toward the peer is still to come."""
    untried: list[Row]
    """``peer_ids`` rows of entities never delivered there: provisioned now."""

    @property
    def pending(self) -> int:
        """How many the resource waits for (0: it is delivered now)."""
        return len(self.waiting) + len(self.untried)


def sort_references(records: Sequence[Row]) -> References:
    """``peer_ids`` rows sorted into held, waiting and never tried (one whose delivery was tried
    and did not create it is left out)."""
    return References(
        views={r["internal_id"]: r["external_id"] for r in records if r["external_id"]},
        waiting=[r["internal_id"] for r in records if not r["external_id"] and r["waiting"]],
        untried=[
            r for r in records if not r["external_id"] and not r["waiting"] and not r["tried"]
        ],
    )


def copy_outcome(*, stale: bool, recorded: bool) -> tuple[bool, bool]:
    """After a write: (drop the copy, sync the entity again). A copy that changed on the write's
    way (not ``recorded``) is not known any more; a reference that moved meanwhile (``stale``)
    or an unknown copy make the entity sync again."""
    return not recorded, stale or not recorded


# ------------------------------------------------------------------ a create


@dataclass(frozen=True)
class Created:
    """The peer made the resource: its ID."""

    peer_id: str


@dataclass(frozen=True)
class Link:
    """The peer holds the unique value already and the domain links: look it up by ``key``."""

    key: str


@dataclass(frozen=True)
class Refused:
    """The peer refused the create (or answered without an ID: ``no_id``)."""

    no_id: bool = False


def create_answer(
    status: int, body: Any, *, on_conflict: str, resource_type: str
) -> Created | Link | Refused:
    """What a peer's answer to a POST of a new resource means."""
    if status == 409 and on_conflict == "link" and resource_type in UNIQUE_BY:
        return Link(UNIQUE_BY[resource_type])
    if status != 201 or not isinstance(body, dict):
        return Refused()
    peer_id = body.get("id")
    return Created(peer_id) if isinstance(peer_id, str) else Refused(no_id=True)


def link_target(matches: Sequence[str]) -> str | None:
    """The peer's resource a create links to: the one holding the unique value, if just one."""
    return matches[0] if len(matches) == 1 else None


def patient(
    failure: Failure, *, conflict_since: float | None, now: float, patience: float
) -> Failure:
    """A 409 is retried for ``patience`` seconds from the first one (``conflict_since``, epoch
    seconds) before it is a dead letter: the value may sit on an account changing hands. Other
    failures are as they are."""
    if failure.status != 409:
        return failure
    since = conflict_since or now
    if now - since >= patience:
        return dataclasses.replace(failure, conflict_since=since)
    return dataclasses.replace(
        failure,
        conflict_since=since,
        verdict=Verdict.TRANSIENT,
        peer_fault=False,
        reason=failure.reason + f" (retried for {patience:.0f} s first: the value may be"
        " on an account changing hands)",
    )


def unique_value(resource_type: str, desired: Mapping[str, Any]) -> tuple[str, str] | None:
    """The attribute a peer holds unique for the resource type, and the document's value."""
    key = UNIQUE_BY.get(resource_type)
    value = desired.get(key) if key else None
    if key is None or not isinstance(value, str):
        return None
    return key, value


def park(key: str, value: str, holder: str) -> dict[str, Any]:
    """The PATCH that parks ``value`` of account ``holder`` aside, freeing it for another."""
    return {
        "schemas": [PATCH_SCHEMA],
        "Operations": [{"op": "replace", "path": key, "value": f"{value}~{holder[:8]}"}],
    }


# ------------------------------------------------------------------ an update


@dataclass(frozen=True)
class UpdatePlan:
    """How a peer's account is brought to home's state."""

    patch: list[dict[str, Any]] | None
    """The PATCH operations, when the copy is known (used if the peer takes PATCH)."""
    put: dict[str, Any]
    """The PUT body otherwise."""


def plan_update(
    copy: Mapping[str, Any] | None,
    desired: Mapping[str, Any],
    *,
    suspended: bool,
    write_only: Mapping[str, Any],
) -> UpdatePlan | None:
    """The write that brings the peer from what it last received (``copy``; None: unknown) to
    ``desired``, reactivating a suspended account and setting write-only values; None when the
    peer holds what home holds."""
    ops = scim_patch(copy, desired) if copy is not None else None
    if ops == [] and not suspended and not write_only:
        return None
    if ops is not None:
        if suspended and "active" not in desired:
            ops.append({"op": "replace", "path": "active", "value": True})
        ops += [{"op": "replace", "path": k, "value": v} for k, v in write_only.items()]
    return UpdatePlan(ops, {**desired, **write_only})


# ------------------------------------------------------------------ a deprovision


@dataclass(frozen=True)
class DropPending:
    """The peer has no account (or the type no endpoint): the pending row goes, and with
    ``undo`` whatever a create whose answer was lost made there first."""

    undo: bool


@dataclass(frozen=True)
class Suspend:
    """PATCH ``active`` false (the account suspended ``at``), and look again at ``delete_at``."""

    at: datetime
    delete_at: datetime


@dataclass(frozen=True)
class WaitSuspended:
    """Suspended already: look again at ``until``."""

    until: datetime


@dataclass(frozen=True)
class Delete:
    """DELETE the account and retire its row."""


def deprovision_step(
    *,
    external_id: str | None,
    endpoint_known: bool,
    mapping_state: str | None,
    policy: str,
    suspended_at: datetime | None,
    suspend_for: timedelta,
    now: datetime,
) -> DropPending | Suspend | WaitSuspended | Delete:
    """What is done once home no longer has the entity (or the peer may no longer see it): a
    peer whose ``deprovision`` is ``suspend`` has the account suspended first and deleted
    ``suspend_for`` after; otherwise it is deleted."""
    if external_id is None or not endpoint_known:
        return DropPending(undo=mapping_state == "pending_create" and endpoint_known)
    if policy == "suspend":
        if suspended_at is None:
            return Suspend(now, now + suspend_for)
        if suspended_at + suspend_for > now:
            return WaitSuspended(suspended_at + suspend_for)
    return Delete()


SUSPEND_PATCH: dict[str, Any] = {
    "schemas": [PATCH_SCHEMA],
    "Operations": [{"op": "replace", "path": "active", "value": False}],
}


# ------------------------------------------------------------------ a merge's clean-up


def membership_move(members: Any, alias: str, primary: str) -> list[dict[str, Any]] | None:
    """The PATCH operations that make a peer's group (its ``members``) name ``primary`` instead
    of ``alias``; None when it does not name the alias (changed meanwhile: a remove would match
    nothing)."""
    values = {m.get("value") for m in members or [] if isinstance(m, dict)}
    if alias not in values:
        return None
    ops: list[dict[str, Any]] = [{"op": "remove", "path": f"members[value eq {json.dumps(alias)}]"}]
    if primary not in values:
        ops.append({"op": "add", "path": "members", "value": [{"value": primary}]})
    return ops


def follow_move(document: Mapping[str, Any], alias: str, primary: str) -> dict[str, Any]:
    """What a peer last received of a group, once its members name ``primary`` for ``alias``."""
    moved = dict(document)
    members = [m for m in moved.get("members", []) if m.get("value") != alias]
    if not any(m.get("value") == primary for m in members):
        members.append({"value": primary})
    moved["members"] = members
    return moved


# ------------------------------------------------------------------ a pushed SET


@dataclass(frozen=True)
class SetRefused:
    """The receiver refused the SET (RFC 8935 section 2.4): its error, kept with the SET."""

    error: dict[str, Any]


def set_answer(status: int, body: Any) -> bool | SetRefused:
    """A receiver's answer to a pushed SET: True (delivered), its refusal (a 400 with an error
    code), or False (any other failure, judged as a peer's answer is)."""
    if status in (200, 202, 204):
        return True
    if status == 400 and isinstance(body, dict) and isinstance(body.get("err"), str):
        return SetRefused({"err": body["err"], "description": body.get("description")})
    return False
