"""Merge and split of identities as pure functions over mapping rows (DESIGN section 2, seed 002).

Rows in, a plan out: which rows change, which disappear, and the follow-up tasks the peers must
eventually be asked to do. Nothing here touches a database or a network; the store applies a plan
in one transaction together with the outbox rows its tasks imply.

The rules, per domain, for a merge of L into S (S survives):

- S mapped, L not: nothing changes there.
- L mapped, S not: L's row moves to S and stays primary (the peer keeps its account; no delete).
- Both mapped: S's row stays primary; L's row moves to S as a non-primary alias in state
  ``deletion_required``, and the peer is asked, later, to move L's group memberships to S's
  external ID and then to delete L's external ID. A broker-minted alias has no account behind it
  in the peer: it is ``retired`` at once (it keeps resolving inbound) and nothing is sent.
- A create still pending for one side is not wanted any more when the other side is mapped: the
  pending row goes and its create is cancelled (an active row wins over a pending one).

A split of S into S and N keeps S's rows on S; N has none and stays invisible to peers until it is
provisioned. Rows named by the split request move from S to N: the first one N gets in a domain
becomes N's primary there (a pending delete is cancelled: this is how a merge is undone), any
further one is an alias of N, as in a merge.

A plan is the whole decision: besides the rows and the peer tasks, it says which accounts changed
hands (a sync to the new owner's state, or a create anew for an entity left without one), whose
copies at the peer no longer describe an account, which broker groups naming a moved ID are synced
again, which pending creates are undone, which identity notices go to subscribed domains, and for
a split which new entities are held back and which push peers get a sync of them. The store only
writes what the plan says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from broker.errors import InvalidValueError

__all__ = [
    "CANCEL_KINDS",
    "CopyDropped",
    "Handover",
    "IdentityNotice",
    "MappingRow",
    "MappingState",
    "Origin",
    "PeerTask",
    "Plan",
    "RowChange",
    "RuleError",
    "TaskKind",
    "apply_plan",
    "plan_merge",
    "plan_split",
]


class MappingState(StrEnum):
    ACTIVE = "active"
    PENDING_CREATE = "pending_create"
    DELETION_REQUIRED = "deletion_required"
    RETIRED = "retired"


class Origin(StrEnum):
    PEER = "peer"  # assigned by a push peer when the broker provisioned the entity there
    MINTED = "minted"  # an opaque pairwise ID the broker issued


class TaskKind(StrEnum):
    MOVE_MEMBERSHIPS = "move_memberships"  # in the peer: groups holding the alias hold the primary
    DELETE_ALIAS = "delete_alias"  # DELETE the alias's external ID at the peer
    CANCEL_DELETE = "cancel_delete"  # an alias's pending delete is no longer wanted
    CANCEL_CREATE = "cancel_create"  # a pending create is no longer wanted
    PROVISION = "provision"  # create the entity in the peer; its ID becomes the primary


class RuleError(InvalidValueError):
    """A merge or split request that the rules refuse; the message says what to change."""


@dataclass(frozen=True)
class MappingRow:
    """One row of the mapping table: internal ID <-> (domain, external ID, primary flag, state)."""

    internal_id: str
    domain: str
    external_id: str | None
    """None only while a create in a push peer is pending."""
    primary: bool
    state: MappingState = MappingState.ACTIVE
    origin: Origin = Origin.PEER
    row_id: int | None = field(default=None, compare=False)
    """The store's key for the row, carried through unchanged; the rules never read it."""


@dataclass(frozen=True)
class PeerTask:
    """Work a peer must eventually be asked to do, in order per (domain, internal_id)."""

    kind: TaskKind
    domain: str
    internal_id: str
    """The entity the task is about (the survivor for merge clean-up)."""
    external_id: str | None = None
    """The peer-side ID acted on (the alias for deletes and membership moves)."""
    target_external_id: str | None = None
    """For membership moves: the primary external ID the memberships move to."""


@dataclass(frozen=True)
class RowChange:
    before: MappingRow
    after: MappingRow | None
    """None when the row is removed."""


@dataclass(frozen=True)
class Handover:
    """A sync of ``internal_id`` toward push peer ``domain``, after what ``previous`` had under way
    there: an account that changed hands is brought to its new owner's state, or an entity left
    without an account (a split moved it away) is created anew."""

    domain: str
    internal_id: str
    previous: str


@dataclass(frozen=True)
class CopyDropped:
    """What ``domain`` last received of ``before`` and ``after`` no longer describes their
    accounts (a row changed owner or primary flag): the next sync sends the whole resource."""

    domain: str
    before: str
    after: str


@dataclass(frozen=True)
class IdentityNotice:
    """A domain ID that now denotes another entity, for the domains that subscribe to merge and
    split notices: the ID, the entity it denotes now, that entity's primary there, and (for a
    split) the primary of the entity it left."""

    kind: Literal["merge", "split"]
    domain: str
    external_id: str
    internal_id: str
    primary: str | None
    split_from: str | None = None


@dataclass(frozen=True)
class Plan:
    changes: tuple[RowChange, ...] = ()
    tasks: tuple[PeerTask, ...] = ()
    merged: Mapping[str, str] = field(default_factory=dict)
    """For merges: loser -> survivor."""
    undo_creates: tuple[MappingRow, ...] = ()
    """Pending creates in push peers the plan removes: an earlier attempt may have made the
    account with its answer lost, so each is looked up by its handle and deleted."""
    copies_dropped: tuple[CopyDropped, ...] = ()
    handovers: tuple[Handover, ...] = ()
    regroup: tuple[tuple[str, str], ...] = ()
    """(domain, external ID) of accounts that changed hands: the broker's groups there naming
    them are synced again."""
    notices: tuple[IdentityNotice, ...] = ()
    hold_back: Mapping[str, bool] = field(default_factory=dict)
    """For splits: new entity -> provisioned on first need (True) or eagerly (False)."""
    syncs: tuple[tuple[str, str], ...] = ()
    """For eager splits: (push domain, new entity) where the source had no row; nothing else
    would tell those peers about an entity made in home directly."""

    @property
    def deliveries(self) -> tuple[PeerTask, ...]:
        """The tasks that become outbox rows."""
        return tuple(t for t in self.tasks if t.kind not in CANCEL_KINDS)

    @property
    def cancels(self) -> tuple[PeerTask, ...]:
        """The tasks settled at once, by cancelling pending outbox rows."""
        return tuple(t for t in self.tasks if t.kind in CANCEL_KINDS)


CANCEL_KINDS = frozenset({TaskKind.CANCEL_CREATE, TaskKind.CANCEL_DELETE})
"""Tasks the store settles itself, in the operation's transaction."""


def _key(row: MappingRow) -> tuple[str, str | None, str]:
    # (domain, external_id) names a row; a pending row has no external ID yet.
    return (row.domain, row.external_id, row.internal_id if row.external_id is None else "")


def apply_plan(rows: Iterable[MappingRow], plan: Plan) -> list[MappingRow]:
    """The mapping rows after ``plan``: what the store's transaction leaves in the table."""
    replaced = {_key(change.before): change.after for change in plan.changes}
    result = []
    for row in rows:
        key = _key(row)
        if key in replaced:
            after = replaced.pop(key)
            if after is not None:
                result.append(after)
        else:
            result.append(row)
    if replaced:
        raise ValueError(
            f"the plan changes rows that are not in the table: {sorted(map(str, replaced))}"
        )
    return result


class _Builder:
    """Accumulates row changes and tasks while a rule walks the rows."""

    def __init__(self) -> None:
        self.before: dict[tuple[str, str | None, str], MappingRow] = {}
        self.after: dict[tuple[str, str | None, str], MappingRow | None] = {}
        # The original key of every row the plan has produced so far.
        self.origin: dict[tuple[str, str | None, str], tuple[str, str | None, str]] = {}
        self.tasks: list[PeerTask] = []

    def set(self, current: MappingRow, new: MappingRow | None) -> None:
        """``current`` (as in the table, or as this plan left it) becomes ``new``."""
        key = self.origin.pop(_key(current), _key(current))
        self.before.setdefault(key, current)
        self.after[key] = new
        if new is not None:
            self.origin[_key(new)] = key

    def plan(self, merged: Mapping[str, str] | None = None) -> Plan:
        changes = tuple(
            RowChange(self.before[key], new)
            for key, new in self.after.items()
            if new is None or new != self.before[key]
        )
        return Plan(changes, tuple(self.tasks), dict(merged or {}))


def _complete(
    kind: Literal["merge", "split"],
    rows: Sequence[MappingRow],
    plan: Plan,
    push_domains: Collection[str],
    *,
    hold_back: Mapping[str, bool] | None = None,
    syncs: tuple[tuple[str, str], ...] = (),
) -> Plan:
    """``plan`` (rows, tasks, merges) with what follows from its row changes for the peers."""
    changes, merged = plan.changes, plan.merged
    moved = [
        c
        for c in changes
        if c.after is None
        or (c.after.internal_id, c.after.primary) != (c.before.internal_id, c.before.primary)
    ]
    # The new owner's copy goes only where it takes the account over (an alias leaves the
    # survivor's own account, and what it last received, as they are).
    copies = tuple(
        CopyDropped(
            c.before.domain,
            c.before.internal_id,
            c.after.internal_id if c.after and c.after.primary else c.before.internal_id,
        )
        for c in moved
    )
    # An account that changed hands is brought to its new owner's state (a create still on its
    # way for the previous owner is finished as the new owner's, after the previous owner's
    # attempt); a live entity left without an account in a peer (a split moved it away) is
    # created there anew, after its old account's new owner made it theirs (the values that must
    # stay unique move off it first).
    handovers = _handovers(moved, changes, merged, push_domains)
    regroup = tuple(
        (c.before.domain, c.before.external_id)
        for c in moved
        if c.after and c.after.internal_id != c.before.internal_id and c.before.external_id
    )
    undo = tuple(
        c.before
        for c in changes
        if c.after is None
        and c.before.state is MappingState.PENDING_CREATE
        and c.before.domain in push_domains
    )
    return dataclasses.replace(
        plan,
        undo_creates=undo,
        copies_dropped=copies,
        handovers=handovers,
        regroup=regroup,
        notices=_notices(kind, changes, apply_plan(rows, plan)) if changes else (),
        hold_back=dict(hold_back or {}),
        syncs=syncs,
    )


def _handovers(
    moved: Sequence[RowChange],
    changes: Iterable[RowChange],
    merged: Collection[str],
    push_domains: Collection[str],
) -> tuple[Handover, ...]:
    """The push peers' accounts that change hands (each to be brought to its new owner's state),
    and live entities left without an account in a push peer (to be created there anew), one per
    (domain, entity), the first found kept."""
    primaries_after = {
        (c.after.internal_id, c.after.domain) for c in changes if c.after and c.after.primary
    }
    found: dict[tuple[str, str], Handover] = {}
    candidates = [
        Handover(c.after.domain, c.after.internal_id, c.before.internal_id)
        for c in moved
        if c.after
        and c.after.primary
        and c.after.state in (MappingState.ACTIVE, MappingState.PENDING_CREATE)
    ] + [
        Handover(
            c.before.domain,
            c.before.internal_id,
            c.after.internal_id if c.after else c.before.internal_id,
        )
        for c in moved
        if c.before.primary
        and c.before.internal_id not in merged
        and (c.before.internal_id, c.before.domain) not in primaries_after
    ]
    for handover in candidates:
        if handover.domain in push_domains:
            found.setdefault((handover.domain, handover.internal_id), handover)
    return tuple(found.values())


def _notices(
    kind: Literal["merge", "split"], changes: Iterable[RowChange], after: Iterable[MappingRow]
) -> tuple[IdentityNotice, ...]:
    """One notice per domain ID that the plan moved to another entity."""
    primaries = {(r.internal_id, r.domain): r.external_id for r in after if r.primary}
    return tuple(
        IdentityNotice(
            kind,
            c.before.domain,
            c.before.external_id,
            c.after.internal_id,
            primaries.get((c.after.internal_id, c.before.domain)),
            primaries.get((c.before.internal_id, c.before.domain)) if kind == "split" else None,
        )
        for c in changes
        if c.after is not None
        and c.before.external_id is not None
        and c.after.internal_id != c.before.internal_id
    )


def _by_entity(rows: Iterable[MappingRow], allowed: Collection[str]) -> dict[str, list[MappingRow]]:
    grouped: dict[str, list[MappingRow]] = {entity: [] for entity in allowed}
    for row in rows:
        if row.internal_id not in grouped:
            raise ValueError(f"row {row} belongs to none of the entities in the request")
        grouped[row.internal_id].append(row)
    return grouped


def _primary(rows: Iterable[MappingRow], domain: str) -> MappingRow | None:
    return next((r for r in rows if r.domain == domain and r.primary), None)


def _as_alias(row: MappingRow, owner: str, primary: MappingRow, build: _Builder) -> MappingRow:
    """``row`` (a primary of another entity) becomes an alias of ``owner``, whose primary is ``primary``."""
    if row.origin is Origin.MINTED:
        # Nothing exists in the peer behind a minted ID: retire it, it keeps resolving inbound.
        return dataclasses.replace(
            row, internal_id=owner, primary=False, state=MappingState.RETIRED
        )
    build.tasks.append(
        PeerTask(TaskKind.MOVE_MEMBERSHIPS, row.domain, owner, row.external_id, primary.external_id)
    )
    build.tasks.append(PeerTask(TaskKind.DELETE_ALIAS, row.domain, owner, row.external_id))
    return dataclasses.replace(
        row, internal_id=owner, primary=False, state=MappingState.DELETION_REQUIRED
    )


def _absorb(owner_rows: list[MappingRow], row: MappingRow, owner: str, build: _Builder) -> None:
    """Give ``row`` (a row of another entity) to ``owner``, whose rows ``owner_rows`` are updated.

    Callers hand over primaries before aliases, so an alias is only revived where the owner ends
    up with no primary at all.
    """
    current = _primary(owner_rows, row.domain)
    moved: MappingRow | None
    if current is None:
        moved = (
            dataclasses.replace(row, internal_id=owner)
            if row.primary
            else _revive(row, owner, build)
        )
    elif not row.primary:
        moved = dataclasses.replace(row, internal_id=owner)
    elif row.state is MappingState.PENDING_CREATE:
        build.tasks.append(PeerTask(TaskKind.CANCEL_CREATE, row.domain, row.internal_id))
        moved = None
    elif current.state is MappingState.PENDING_CREATE:
        # An account that exists beats one not yet created: keep the active row, cancel the create.
        build.tasks.append(PeerTask(TaskKind.CANCEL_CREATE, row.domain, owner))
        build.set(current, None)
        owner_rows.remove(current)
        moved = dataclasses.replace(row, internal_id=owner)
    else:
        moved = _as_alias(row, owner, current, build)
    build.set(row, moved)
    if moved is not None:
        owner_rows.append(moved)


def _primaries_first(rows: Iterable[MappingRow]) -> list[MappingRow]:
    return sorted(rows, key=lambda r: not r.primary)


def _revive(alias: MappingRow, owner: str, build: _Builder) -> MappingRow:
    """An alias that becomes its owner's primary again, where that is still possible."""
    if alias.state is MappingState.DELETION_REQUIRED:
        build.tasks.append(PeerTask(TaskKind.CANCEL_DELETE, alias.domain, owner, alias.external_id))
    elif alias.origin is Origin.PEER:
        # Retired peer-assigned alias: the peer already deleted the account. It keeps resolving
        # inbound, but cannot be primary; the owner is provisioned anew when needed.
        return dataclasses.replace(alias, internal_id=owner)
    return dataclasses.replace(alias, internal_id=owner, primary=True, state=MappingState.ACTIVE)


def _domains(rows: Iterable[MappingRow]) -> list[str]:
    return list(dict.fromkeys(r.domain for r in rows))


def _check_ids(label: str, ids: Sequence[str], other: str) -> None:
    if not ids:
        raise RuleError(f"{label}: name at least one internal ID")
    if len(set(ids)) != len(ids):
        raise RuleError(f"{label}: an internal ID is named twice: {list(ids)}")
    if other in ids:
        raise RuleError(f"{label}: {other} cannot be on both sides of the operation")


def plan_merge(
    survivor: str,
    losers: Sequence[str],
    rows: Iterable[MappingRow],
    *,
    push_domains: Collection[str] = (),
) -> Plan:
    """Merge ``losers`` into ``survivor`` (a false negative found): the rows of the entities, changed.

    ``rows`` are all current mapping rows of the survivor and the losers; ``push_domains`` the
    domains the broker provisions into (handovers and undone creates are theirs only). An N-way
    merge applies the rule to each loser in turn.
    """
    _check_ids("merge losers", losers, survivor)
    loaded = list(rows)
    grouped = _by_entity(loaded, [survivor, *losers])
    build = _Builder()
    survivor_rows = grouped[survivor]
    for loser in losers:
        for row in _primaries_first(grouped[loser]):
            _absorb(survivor_rows, row, survivor, build)
    plan = build.plan(merged={loser: survivor for loser in losers})
    return _complete("merge", loaded, plan, push_domains)


def _check_moves(
    source: str,
    moves: Mapping[str, Sequence[tuple[str, str]]],
    by_name: Mapping[tuple[str, str], MappingRow],
) -> None:
    """RuleError if a split moves a row twice, or a row that is not the source's."""
    claimed: dict[tuple[str, str], str] = {}
    for new_id, refs in moves.items():
        for domain, external_id in refs:
            if (domain, external_id) in claimed:
                raise RuleError(
                    f"split: {domain}:{external_id} is moved twice (to {claimed[domain, external_id]} "
                    f"and {new_id}); name each row once"
                )
            if (domain, external_id) not in by_name:
                raise RuleError(
                    f"split: {domain}:{external_id} is not mapped to {source}; "
                    f"list its rows with `broker mappings {source}`"
                )
            claimed[domain, external_id] = new_id


def plan_split(
    source: str,
    moves: Mapping[str, Sequence[tuple[str, str]]],
    rows: Iterable[MappingRow],
    *,
    push_domains: Collection[str] = (),
    provision: Literal["eager", "on_demand"] = "on_demand",
) -> Plan:
    """Split ``source`` (a false positive found) into itself and the new entities in ``moves``.

    ``moves`` maps each new internal ID (already created in home) to the (domain, external ID)
    rows that move from ``source`` to it; a new ID may move nothing. ``rows`` are all current rows
    of the source and the new entities. With ``provision="eager"``, every push domain that knew
    the source and where a new entity (or the source, after its primary moved) has no primary
    gets a provisioning task, and every other push domain a sync of the new entities; otherwise
    provisioning waits for first need.
    """
    new_ids = list(moves)
    _check_ids("split new entities", new_ids, source)
    loaded = list(rows)
    grouped = _by_entity(loaded, [source, *new_ids])
    source_rows = grouped[source]
    known_domains = _domains(source_rows)
    by_name = {(r.domain, r.external_id): r for r in source_rows if r.external_id is not None}
    _check_moves(source, moves, by_name)
    build = _Builder()
    lost_primary: list[str] = []
    for new_id, refs in moves.items():
        for row in _primaries_first(by_name[ref] for ref in refs):
            source_rows.remove(row)
            if row.primary:
                lost_primary.append(row.domain)
            _absorb(grouped[new_id], row, new_id, build)

    # The source keeps a primary where it still has a live alias: the first one is revived.
    for domain in lost_primary:
        for alias in [r for r in source_rows if r.domain == domain]:
            revived = _revive(alias, source, build)
            if revived.primary:
                build.set(alias, revived)
                source_rows[source_rows.index(alias)] = revived
                break

    if provision == "eager":
        for entity in [source, *new_ids]:
            for domain in known_domains:
                if domain in push_domains and _primary(grouped[entity], domain) is None:
                    build.tasks.append(PeerTask(TaskKind.PROVISION, domain, entity))
    # Push peers that never knew the source (its create still to come) get a sync of the new
    # entities when they are eager: nothing else would tell them about an entity made in home.
    unknown = sorted(set(push_domains) - set(known_domains)) if provision == "eager" else []
    syncs = tuple((domain, new_id) for domain in unknown for new_id in new_ids)
    hold_back = {new_id: provision == "on_demand" for new_id in new_ids}
    return _complete("split", loaded, build.plan(), push_domains, hold_back=hold_back, syncs=syncs)
