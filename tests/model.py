"""A second, deliberately naive implementation of seed 002's merge and split rules, and random
operation sequences over it.

Nothing here calls :mod:`broker.mapping.rules`' planners: the model is written straight from the
seed's tables and the rule list of docs/architecture.md, over one mutable list of rows, and
mirrors the store's refusals. The property tests run the same sequences through this model and
through the pure rules (``tests/test_rules_properties.py``) or the PostgreSQL store
(``tests/test_store_properties.py``), so they compare two implementations.

Per domain, a merge of L into S (each loser in turn, its primaries before its aliases):

- S mapped, L not: nothing.
- L mapped, S not: L's row moves to S and stays primary (pending or not).
- both mapped: S's row stays primary; L's moves to S as an alias, ``deletion_required``, and the
  peer is asked to move L's memberships to S's ID, then to delete L's ID; a minted alias is
  retired at once with nothing sent; a pending create of L is cancelled (its row goes); a pending
  create of S is cancelled when L has an account (S's row goes, L's becomes S's primary).
- an alias of L moves to S unchanged, unless S has no primary there: then it comes back as S's
  primary (its delete cancelled), except a retired peer alias (the peer deleted that account).

A split moves only the rows the request names, each new entity's primaries first, by the same
rule with the new entity as survivor; where the source lost its primary, its first alias that can
come back does. Eager splits provision every entity without a primary in each push domain that
knew the source.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from hypothesis import strategies as st

from broker.mapping.rules import MappingRow, MappingState, Origin

MINTED_DOMAIN = "D1"  # the broker issues pairwise IDs there
PUSH_DOMAINS = ("D2", "D3")  # the broker provisions there; the peer assigns IDs
DOMAINS = (MINTED_DOMAIN, *PUSH_DOMAINS)
USERS = tuple(f"E{i}" for i in range(6))
GROUPS = ("G0", "G1")
ENTITIES = (*USERS, *GROUPS)
TYPES = {**dict.fromkeys(USERS, "User"), **dict.fromkeys(GROUPS, "Group")}
UNKNOWN = "X0"  # an entity the broker has never seen

ACTIVE = MappingState.ACTIVE
PENDING = MappingState.PENDING_CREATE
DELETION = MappingState.DELETION_REQUIRED
RETIRED = MappingState.RETIRED


# ------------------------------------------------------------------------------ operations


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
    provision: Literal["eager", "on_demand"] = "eager"


@dataclass(frozen=True)
class AckDelete:
    """A peer did an alias's clean-up: memberships moved, the alias deleted. Its row is retired
    (kept for late references) or, with retention 0, removed."""

    domain: str
    retain: bool = False


@dataclass(frozen=True)
class Delete:
    """Home deleted the entity."""

    entity: str


Op = Provision | Merge | Split | AckDelete | Delete


class Refused(Exception):
    """What the broker answers a request it refuses: the status, and whether the pure rules
    refuse it too (the rest are the store's refusals: entities, types, idempotency keys)."""

    def __init__(self, status: int, reason: str, *, rule: bool = False) -> None:
        super().__init__(f"{status} {reason}")
        self.status, self.reason, self.rule = status, reason, rule


@dataclass
class Row:
    """A mapping row, mutable: the model moves rows by changing their fields in place."""

    owner: str
    domain: str
    external_id: str | None
    primary: bool
    state: MappingState
    origin: Origin

    def frozen(self) -> MappingRow:
        return MappingRow(
            self.owner, self.domain, self.external_id, self.primary, self.state, self.origin
        )


@dataclass
class Delivery:
    """A peer task as the outbox holds it."""

    kind: str
    domain: str
    internal_id: str
    external_id: str | None = None
    target: str | None = None
    state: str = "pending"

    def task(self) -> tuple[str, str, str, str | None, str | None]:
        return (self.kind, self.domain, self.internal_id, self.external_id, self.target)


@dataclass
class Entity:
    type: str
    state: str = "active"
    merged_into: str | None = None


# ------------------------------------------------------------------------------ the model


@dataclass
class Federation:
    rows: list[Row] = field(default_factory=list)
    entities: dict[str, Entity] = field(
        default_factory=lambda: {e: Entity(TYPES[e]) for e in ENTITIES}
    )
    deliveries: list[Delivery] = field(default_factory=list)
    keys: dict[str, tuple[object, ...]] = field(default_factory=dict)
    """Idempotency key -> the request it was used for (only operations that were done)."""
    done: dict[str, Merge | Split] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    # ---------------------------------------------------------------- reading

    def live(self) -> list[str]:
        return [e for e, entity in self.entities.items() if entity.state == "active"]

    def table(self) -> set[tuple[str, str, str | None, bool, str]]:
        return {(r.owner, r.domain, r.external_id, r.primary, r.state.value) for r in self.rows}

    def mapping_rows(self, *entities: str) -> list[MappingRow]:
        """The rows (of ``entities``, or all), in the order they were created."""
        return [r.frozen() for r in self.rows if not entities or r.owner in entities]

    def primary(self, owner: str, domain: str) -> Row | None:
        return next(
            (r for r in self.rows if r.owner == owner and r.domain == domain and r.primary), None
        )

    def new_entity(self) -> str:
        """A name for an entity home creates for a split (the broker records it then)."""
        return f"N{next(self._ids)}"

    def new_key(self) -> str:
        return f"op{next(self._ids)}"

    # ---------------------------------------------------------------- the world

    def provision(self, op: Provision, external_id: str | None = None) -> Row | None:
        entity = self.entities.get(op.entity)
        if entity is None or entity.state != "active" or self.primary(op.entity, op.domain):
            return None
        minted = op.domain == MINTED_DOMAIN
        pending = op.pending and not minted
        if external_id is None and not pending:
            external_id = f"{op.domain.lower()}-{next(self._ids)}"
        new = Row(
            op.entity,
            op.domain,
            None if pending else external_id,
            True,
            PENDING if pending else ACTIVE,
            Origin.MINTED if minted else Origin.PEER,
        )
        self.rows.append(new)
        return new

    def ack_delete(self, op: AckDelete) -> Delivery | None:
        """The first pending alias delete toward ``op.domain`` is done, after its membership
        move; the alias's row is retired or removed."""
        delete = next(
            (
                d
                for d in self.deliveries
                if d.kind == "delete_alias" and d.domain == op.domain and d.state == "pending"
            ),
            None,
        )
        if delete is None:
            return None
        for d in self.deliveries:
            if (
                d.state == "pending"
                and d.domain == op.domain
                and d.external_id == delete.external_id
                and d.kind in ("move_memberships", "delete_alias")
            ):
                d.state = "done"
        for r in list(self.rows):
            if (r.domain, r.external_id, r.state) == (op.domain, delete.external_id, DELETION):
                if op.retain:
                    r.state = RETIRED
                else:
                    self.rows.remove(r)
        return delete

    def delete(self, op: Delete) -> None:
        entity = self.entities.get(op.entity)
        if entity is not None and entity.state == "active":
            entity.state = "deleted"

    # ---------------------------------------------------------------- merge and split

    def merge(self, op: Merge) -> bool:
        """Apply ``op``, or raise :class:`Refused`. False when its key replays a done merge."""
        request = ("merge", op.survivor, op.losers)
        if self._replayed(op.key, request):
            return False
        self._require_live([op.survivor, *op.losers])
        self._require_same_type(op.survivor, op.losers)
        self._require_ids("merge losers", op.losers, op.survivor)
        survivor = op.survivor
        for loser in op.losers:
            own = [r for r in self.rows if r.owner == loser]
            for r in [r for r in own if r.primary] + [r for r in own if not r.primary]:
                self._hand(r, survivor)
            self.entities[loser].state = "merged"
            for entity in self.entities.values():
                if entity.merged_into == loser:
                    entity.merged_into = survivor
            self.entities[loser].merged_into = survivor
        self.keys[op.key] = request
        self.done[op.key] = op
        return True

    def split(self, op: Split) -> bool:
        """Apply ``op``, or raise :class:`Refused`. False when its key replays a done split."""
        request = ("split", op.source, frozenset(op.moves), op.provision)
        if self._replayed(op.key, request):
            return False
        new_ids = [new for new, _ in op.moves]
        self._require_live([op.source])
        # Home made the new entities: the broker records those it has not seen, as the source's
        # kind, in the operation's transaction (a refusal records nothing).
        unseen = [new for new in new_ids if new not in self.entities]
        for new in unseen:
            self.entities[new] = Entity(self.entities[op.source].type)
        try:
            named = self._check_split(op, new_ids)
        except Refused:
            for new in unseen:
                del self.entities[new]
            raise
        knew = list(dict.fromkeys(r.domain for r in self.rows if r.owner == op.source))
        lost: list[str] = []
        for new, refs in op.moves:
            chosen = [named[ref] for ref in refs]
            for r in [r for r in chosen if r.primary] + [r for r in chosen if not r.primary]:
                if r.primary:
                    lost.append(r.domain)
                self._hand(r, new)
        for domain in lost:  # the source's first alias there that can come back does
            for r in [r for r in self.rows if r.owner == op.source and r.domain == domain]:
                if self._revive(r, op.source):
                    break
        if op.provision == "eager":
            for entity in [op.source, *new_ids]:
                for domain in knew:
                    if domain in PUSH_DOMAINS and self.primary(entity, domain) is None:
                        self.deliveries.append(Delivery("provision", domain, entity))
        self.keys[op.key] = request
        self.done[op.key] = op
        return True

    def _check_split(self, op: Split, new_ids: list[str]) -> dict[tuple[str, str], Row]:
        self._require_live(new_ids)
        self._require_same_type(op.source, new_ids)
        self._require_ids("split new entities", new_ids, op.source)
        named: dict[tuple[str, str], Row] = {}
        for _, refs in op.moves:
            for ref in refs:
                if ref in named:
                    raise Refused(400, f"{ref} is moved twice", rule=True)
                row = next(
                    (
                        r
                        for r in self.rows
                        if r.owner == op.source and (r.domain, r.external_id) == ref
                    ),
                    None,
                )
                if row is None:
                    raise Refused(400, f"{ref} is not mapped to {op.source}", rule=True)
                named[ref] = row
        return named

    def _hand(self, r: Row, owner: str) -> None:
        """Row ``r`` of another entity goes to ``owner``: the seed's table, for one domain."""
        mine = self.primary(owner, r.domain)
        if not r.primary:  # an alias
            if mine is None and self._revive(r, owner):
                return
            r.owner = owner  # its pending delete, if any, goes on
        elif mine is None:  # only the row's entity is mapped there: the row moves, still primary
            r.owner = owner
        elif r.state is PENDING:  # the owner has an account, or a create of its own
            self._cancel_create(r.domain, r.owner)
            self.rows.remove(r)
        elif mine.state is PENDING:  # an account that exists beats one not yet created
            self._cancel_create(r.domain, owner)
            self.rows.remove(mine)
            r.owner = owner
        elif r.origin is Origin.MINTED:  # nothing exists behind a minted ID
            r.owner, r.primary, r.state = owner, False, RETIRED
        else:  # both mapped: the row becomes an alias, cleaned up later
            self.deliveries.append(
                Delivery("move_memberships", r.domain, owner, r.external_id, mine.external_id)
            )
            self.deliveries.append(Delivery("delete_alias", r.domain, owner, r.external_id))
            r.owner, r.primary, r.state = owner, False, DELETION

    def _revive(self, r: Row, owner: str) -> bool:
        """Alias ``r`` becomes ``owner``'s primary again, where the peer still has its account."""
        if r.state is RETIRED and r.origin is Origin.PEER:
            return False  # the peer deleted it
        if r.state is DELETION:
            for d in self.deliveries:
                if (
                    d.state == "pending"
                    and d.domain == r.domain
                    and d.external_id == r.external_id
                    and d.kind in ("move_memberships", "delete_alias")
                ):
                    d.state = "cancelled"
        r.owner, r.primary, r.state = owner, True, ACTIVE
        return True

    def _cancel_create(self, domain: str, entity: str) -> None:
        for d in self.deliveries:
            if (d.kind, d.domain, d.internal_id, d.state) == (
                "provision",
                domain,
                entity,
                "pending",
            ):
                d.state = "cancelled"

    # ---------------------------------------------------------------- refusals, in the store's order

    def _replayed(self, key: str, request: tuple[object, ...]) -> bool:
        if key not in self.keys:
            return False
        if self.keys[key] != request:
            raise Refused(409, f"key {key} was used for another request")
        return True

    def _require_live(self, ids: list[str]) -> None:
        for internal_id in ids:
            entity = self.entities.get(internal_id)
            if entity is None:
                raise Refused(404, f"{internal_id} is unknown")
            if entity.state != "active":
                raise Refused(409, f"{internal_id} is {entity.state}")

    def _require_same_type(self, first: str, others: tuple[str, ...] | list[str]) -> None:
        for other in others:
            if self.entities[other].type != self.entities[first].type:
                raise Refused(400, f"{other} and {first} differ in type")

    @staticmethod
    def _require_ids(label: str, ids: tuple[str, ...] | list[str], other: str) -> None:
        if not ids:
            raise Refused(400, f"{label}: none", rule=True)
        if len(set(ids)) != len(ids):
            raise Refused(400, f"{label}: named twice", rule=True)
        if other in ids:
            raise Refused(400, f"{label}: {other} on both sides", rule=True)


# ------------------------------------------------------------------------------ strategies

REFUSALS = (
    "self-merge",
    "merged",
    "deleted",
    "unknown",
    "type",
    "named-twice",
    "foreign-row",
    "moved-twice",
    "key-reused",
)


@st.composite
def operations(draw: st.DrawFn, fed: Federation) -> Op:
    """One operation in ``fed``'s current state: often one the broker must refuse (a
    self-merge, a merged, deleted or unknown entity, a type mismatch, a row of another entity, a
    key reused for another request), and often an alias's clean-up completed by its peer."""
    live = fed.live()
    pending_deletes = [
        d.domain for d in fed.deliveries if d.kind == "delete_alias" and d.state == "pending"
    ]
    kinds = ["provision"] * 5 + ["merge"] * 3 + ["split"] * 2 + ["refused"] * 2 + ["delete"]
    if pending_deletes:
        kinds += ["ack"] * 3
    if fed.done:
        kinds += ["replay"]
    kind = draw(st.sampled_from(kinds))
    users = [e for e in live if fed.entities[e].type == "User"]
    if (
        kind == "provision"
        or (kind == "merge" and len(users) < 2)
        or (kind == "split" and not live)
    ):
        return Provision(
            draw(st.sampled_from(users if users and draw(st.booleans()) else live or [*ENTITIES])),
            draw(st.sampled_from([*DOMAINS, *PUSH_DOMAINS])),
            draw(st.integers(0, 3)) == 0,
        )
    if kind == "ack":
        return AckDelete(draw(st.sampled_from(pending_deletes)), draw(st.booleans()))
    if kind == "delete":
        return Delete(draw(st.sampled_from(list(fed.entities))))
    if kind == "replay":
        return fed.done[draw(st.sampled_from(sorted(fed.done)))]
    if kind == "merge":
        # Mostly among users with an account in one push peer: both mapped there, so the
        # loser's account becomes an alias whose clean-up the peer can later complete.
        domain = draw(st.sampled_from(PUSH_DOMAINS))
        mapped = [u for u in users if (p := fed.primary(u, domain)) and p.state is ACTIVE]
        unmapped = [u for u in users if fed.primary(u, domain) is None]
        if len(mapped) < 2 and unmapped and draw(st.booleans()):
            return Provision(draw(st.sampled_from(unmapped)), domain)  # the peer has its account
        pool = mapped if len(mapped) >= 2 and draw(st.integers(0, 3)) > 0 else users
        most = 2 if pool is mapped else 4
        chosen = draw(st.lists(st.sampled_from(pool), min_size=2, max_size=most, unique=True))
        return Merge(chosen[0], tuple(chosen[1:]), fed.new_key())
    if kind == "split":
        return _split(draw, fed, draw(st.sampled_from(live)))
    return _refused(draw, fed, draw(st.sampled_from(REFUSALS)))


def _split(draw: st.DrawFn, fed: Federation, source: str, *, foreign: bool = False) -> Split:
    movable = [(r.domain, r.external_id) for r in fed.rows if r.owner == source and r.external_id]
    others = [(r.domain, r.external_id) for r in fed.rows if r.owner != source and r.external_id]
    new_ids = [fed.new_entity() for _ in range(draw(st.integers(1, 3)))]
    if draw(st.integers(0, 9)) == 0:  # sometimes an entity the broker has, as a new one
        new_ids[0] = draw(st.sampled_from(list(fed.entities)))
    moves: dict[str, list[tuple[str, str]]] = {new: [] for new in new_ids}
    for ref in movable:
        target = draw(st.sampled_from([None, *moves]))
        if target is not None:
            moves[target].append(ref)  # type: ignore[arg-type]
    if foreign and others:
        moves[new_ids[0]].append(draw(st.sampled_from(others)))  # type: ignore[arg-type]
    return Split(
        source,
        tuple((new, tuple(refs)) for new, refs in moves.items()),
        fed.new_key(),
        draw(st.sampled_from(["eager", "on_demand"])),
    )


def _refused(draw: st.DrawFn, fed: Federation, flavour: str) -> Op:
    """An operation meant to be refused (it is not, where the state does not allow the flaw)."""
    live = fed.live()
    gone_state = "merged" if flavour == "merged" else "deleted"
    dead = [e for e, x in fed.entities.items() if x.state == gone_state]
    someone = draw(st.sampled_from(live or list(ENTITIES)))
    key = fed.new_key()
    if flavour == "self-merge":
        return Merge(someone, (someone,), key)
    if flavour in ("merged", "deleted") and dead:
        gone = draw(st.sampled_from(dead))
        if draw(st.booleans()):
            return Merge(gone, (someone,), key)
        return _split(draw, fed, gone) if draw(st.booleans()) else Merge(someone, (gone,), key)
    if flavour == "unknown":
        if draw(st.booleans()):
            return Merge(someone, (UNKNOWN,), key)
        return _split(draw, fed, UNKNOWN)
    if flavour == "type":
        user = draw(st.sampled_from(USERS))
        group = draw(st.sampled_from(GROUPS))
        return Merge(user, (group,), key) if draw(st.booleans()) else Merge(group, (user,), key)
    if flavour == "named-twice":
        other = draw(st.sampled_from(list(fed.entities)))
        return Merge(someone, (other, other), key)
    if flavour == "moved-twice":
        refs = [(r.domain, r.external_id) for r in fed.rows if r.owner == someone and r.external_id]
        if refs:
            ref = draw(st.sampled_from(refs))
            first, second = fed.new_entity(), fed.new_entity()
            return Split(someone, ((first, (ref,)), (second, (ref,))), key)  # type: ignore[arg-type]
    if flavour == "key-reused" and fed.keys:
        reused = draw(st.sampled_from(sorted(fed.keys)))
        other = draw(st.sampled_from(list(fed.entities)))
        return Merge(someone, (other,), reused)
    return _split(draw, fed, someone, foreign=True)


# ------------------------------------------------------------------------------ invariants


def check_invariants(fed: Federation) -> None:
    """What must hold of the mapping table after any sequence of operations."""
    names = Counter((r.domain, r.external_id) for r in fed.rows if r.external_id is not None)
    duplicated = [name for name, n in names.items() if n > 1]
    assert not duplicated, f"an external ID names two rows: {duplicated}"
    primaries = Counter((r.owner, r.domain) for r in fed.rows if r.primary)
    assert all(n == 1 for n in primaries.values()), f"two primaries: {primaries}"
    outstanding = {
        (d.domain, d.external_id)
        for d in fed.deliveries
        if d.kind == "delete_alias" and d.state == "pending"
    }
    for r in fed.rows:
        # Every external ID resolves to exactly one entity that was never merged away.
        assert fed.entities[r.owner].state != "merged", f"{r} resolves to a merged entity"
        assert r.primary == (r.state in (ACTIVE, PENDING)), r
        assert (r.external_id is None) == (r.state is PENDING), r
        # Every alias awaiting deletion has its delete requested, and no peer is asked to delete
        # a primary (or anything but such an alias).
        assert (r.state is DELETION) == ((r.domain, r.external_id) in outstanding), r


def external_names(rows: list[Row]) -> Counter[tuple[str, str]]:
    return Counter((r.domain, r.external_id) for r in rows if r.external_id is not None)
