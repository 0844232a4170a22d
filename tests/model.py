"""A pure in-memory federation driven by the rules, and random operation sequences over it.

The property tests run the same sequences through this model and through the PostgreSQL store.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import strategies as st

from broker.mapping.rules import (
    MappingRow,
    MappingState,
    Origin,
    PeerTask,
    Plan,
    RuleError,
    TaskKind,
    apply_plan,
    plan_merge,
    plan_split,
)

MINTED_DOMAIN = "D1"  # the broker issues pairwise IDs there
PUSH_DOMAINS = ("D2", "D3")  # the broker provisions there; the peer assigns IDs
DOMAINS = (MINTED_DOMAIN, *PUSH_DOMAINS)
ENTITIES = tuple(f"E{i}" for i in range(6))


@dataclass(frozen=True)
class Provision:
    """A domain gets its first ID for an entity (minted in D1, assigned by the peer elsewhere)."""

    entity: str
    domain: str
    pending: bool = False


@dataclass(frozen=True)
class Merge:
    survivor: str
    losers: tuple[str, ...]
    key: str


@dataclass(frozen=True)
class Split:
    source: str
    moves: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    key: str


@dataclass(frozen=True)
class AckDelete:
    """A peer acknowledged the delete of an alias: the row goes."""

    domain: str


Op = Provision | Merge | Split | AckDelete


@dataclass
class Federation:
    rows: list[MappingRow] = field(default_factory=list)
    entities: dict[str, str] = field(default_factory=lambda: {e: "active" for e in ENTITIES})
    tasks: list[PeerTask] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def live(self) -> list[str]:
        return [e for e, state in self.entities.items() if state == "active"]

    def rows_of(self, *entities: str) -> list[MappingRow]:
        return [r for r in self.rows if r.internal_id in entities]

    def new_entity(self) -> str:
        name = f"N{next(self._ids)}"
        self.entities[name] = "active"
        return name

    def provision(self, op: Provision, external_id: str | None = None) -> MappingRow | None:
        if self.entities.get(op.entity) != "active":
            return None
        if any(
            r.primary for r in self.rows if r.internal_id == op.entity and r.domain == op.domain
        ):
            return None
        minted = op.domain == MINTED_DOMAIN
        pending = op.pending and not minted
        if external_id is None and not pending:
            external_id = f"{op.domain.lower()}-{next(self._ids)}"
        new = MappingRow(
            op.entity,
            op.domain,
            None if pending else external_id,
            True,
            MappingState.PENDING_CREATE if pending else MappingState.ACTIVE,
            Origin.MINTED if minted else Origin.PEER,
        )
        self.rows.append(new)
        return new

    def merge(self, op: Merge) -> Plan:
        for entity in (op.survivor, *op.losers):
            if self.entities.get(entity) != "active":
                raise RuleError(f"{entity} is not active")
        plan = plan_merge(op.survivor, op.losers, self.rows_of(op.survivor, *op.losers))
        self._apply(plan)
        for loser in op.losers:
            self.entities[loser] = "merged"
        return plan

    def split(self, op: Split) -> Plan:
        if self.entities.get(op.source) != "active":
            raise RuleError(f"{op.source} is not active")
        moves = {new: list(refs) for new, refs in op.moves}
        for new in moves:
            self.entities.setdefault(new, "active")
        plan = plan_split(
            op.source,
            moves,
            self.rows_of(op.source, *moves),
            push_domains=PUSH_DOMAINS,
            provision="eager",
        )
        self._apply(plan)
        return plan

    def ack_delete(self, op: AckDelete) -> MappingRow | None:
        doomed = next(
            (
                r
                for r in self.rows
                if r.domain == op.domain and r.state is MappingState.DELETION_REQUIRED
            ),
            None,
        )
        if doomed is not None:
            self.rows.remove(doomed)
        return doomed

    def _apply(self, plan: Plan) -> None:
        self.rows = apply_plan(self.rows, plan)
        self.tasks.extend(plan.tasks)


# ------------------------------------------------------------------------------ strategies


@st.composite
def operations(draw: st.DrawFn, fed: Federation) -> Op:
    """One operation that makes sense in ``fed``'s current state (or a refused one, sometimes)."""
    live = fed.live()
    kind = draw(st.sampled_from(["provision", "provision", "merge", "split", "ack"]))
    if kind == "provision" or (len(live) < 2 and kind == "merge"):
        return Provision(
            draw(st.sampled_from(live or ENTITIES)),
            draw(st.sampled_from(DOMAINS)),
            draw(st.booleans()),
        )
    key = f"op{next(fed._ids)}"
    if kind == "merge":
        chosen = draw(st.lists(st.sampled_from(live), min_size=2, max_size=4, unique=True))
        return Merge(chosen[0], tuple(chosen[1:]), key)
    if kind == "split" and live:
        source = draw(st.sampled_from(live))
        movable = [
            (r.domain, r.external_id) for r in fed.rows_of(source) if r.external_id is not None
        ]
        count = draw(st.integers(1, 3))
        new_ids = [fed.new_entity() for _ in range(count)]
        moves: dict[str, list[tuple[str, str]]] = {new: [] for new in new_ids}
        for ref in movable:
            target = draw(st.sampled_from([None, *new_ids]))
            if target is not None:
                moves[target].append(ref)  # type: ignore[arg-type]
        return Split(source, tuple((new, tuple(refs)) for new, refs in moves.items()), key)
    return AckDelete(draw(st.sampled_from(PUSH_DOMAINS)))


def check_invariants(fed: Federation) -> None:
    """What must hold of the mapping table after any sequence of operations."""
    names = Counter((r.domain, r.external_id) for r in fed.rows if r.external_id is not None)
    duplicated = [name for name, n in names.items() if n > 1]
    assert not duplicated, f"an external ID names two rows: {duplicated}"
    primaries = Counter((r.internal_id, r.domain) for r in fed.rows if r.primary)
    assert all(n == 1 for n in primaries.values()), f"two primaries: {primaries}"
    for r in fed.rows:
        # Every external ID resolves to exactly one live entity.
        assert fed.entities[r.internal_id] == "active", f"{r} resolves to a dead entity"
        assert r.primary == (r.state in (MappingState.ACTIVE, MappingState.PENDING_CREATE)), r
        assert (r.external_id is None) == (r.state is MappingState.PENDING_CREATE), r


def external_names(rows: list[MappingRow]) -> Counter[tuple[str, str]]:
    return Counter((r.domain, r.external_id) for r in rows if r.external_id is not None)


def outstanding_deletes(tasks: list[PeerTask]) -> set[tuple[str, str | None]]:
    """Alias deletes requested of peers and not cancelled since."""
    outstanding: set[tuple[str, str | None]] = set()
    for task in tasks:
        if task.kind is TaskKind.DELETE_ALIAS:
            outstanding.add((task.domain, task.external_id))
        elif task.kind is TaskKind.CANCEL_DELETE:
            outstanding.discard((task.domain, task.external_id))
    return outstanding
