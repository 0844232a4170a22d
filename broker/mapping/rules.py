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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from broker.errors import InvalidValueError

__all__ = [
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
class Plan:
    changes: tuple[RowChange, ...] = ()
    tasks: tuple[PeerTask, ...] = ()
    merged: Mapping[str, str] = field(default_factory=dict)
    """For merges: loser -> survivor."""


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


def plan_merge(survivor: str, losers: Sequence[str], rows: Iterable[MappingRow]) -> Plan:
    """Merge ``losers`` into ``survivor`` (a false negative found): the rows of the entities, changed.

    ``rows`` are all current mapping rows of the survivor and the losers. An N-way merge applies
    the rule to each loser in turn.
    """
    _check_ids("merge losers", losers, survivor)
    grouped = _by_entity(rows, [survivor, *losers])
    build = _Builder()
    survivor_rows = grouped[survivor]
    for loser in losers:
        for row in _primaries_first(grouped[loser]):
            _absorb(survivor_rows, row, survivor, build)
    return build.plan(merged={loser: survivor for loser in losers})


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
    gets a provisioning task; otherwise provisioning waits for first need.
    """
    new_ids = list(moves)
    _check_ids("split new entities", new_ids, source)
    grouped = _by_entity(rows, [source, *new_ids])
    source_rows = grouped[source]
    known_domains = _domains(source_rows)
    by_name = {(r.domain, r.external_id): r for r in source_rows if r.external_id is not None}
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
    return build.plan()
