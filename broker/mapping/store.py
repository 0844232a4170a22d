"""The identity map in PostgreSQL: batched translation both ways, and merges and splits applied in
one transaction together with the outbox rows they imply.

The rules themselves are in :mod:`broker.mapping.rules`; this module only loads rows, locks them,
asks the rules, and writes the answer.
"""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import asyncpg

from broker.db import query

if TYPE_CHECKING:
    from broker.db import Connection
from broker.errors import ConflictError, InvalidValueError, NotFoundError
from broker.mapping.cache import MappingCache
from broker.mapping.rules import (
    CANCEL_KINDS,
    IdentityNotice,
    MappingRow,
    MappingState,
    Origin,
    PeerTask,
    Plan,
    apply_plan,
    plan_merge,
    plan_split,
)

__all__ = [
    "EntityStateError",
    "IdempotencyKeyReused",
    "MappingStore",
    "Operation",
    "Outbound",
    "Planner",
    "Preview",
    "UnknownEntity",
    "merge_planner",
    "mint_id",
    "split_planner",
]

# Seconds a look at whether any domain subscribes to events stands.
_SUBSCRIBED_TTL = 2.0


def mint_id() -> str:
    """An opaque pairwise ID: 128 random bits, URL-safe, in no shape a home is likely to use."""
    return secrets.token_urlsafe(16)


def mint_ids(count: int) -> list[str]:
    """``count`` IDs as :func:`mint_id` makes them, from one read of the random source."""
    raw = secrets.token_bytes(16 * count)
    return [
        base64.urlsafe_b64encode(raw[i : i + 16]).rstrip(b"=").decode()
        for i in range(0, len(raw), 16)
    ]


class UnknownEntity(NotFoundError):
    """An internal ID the broker has never seen."""


class EntityStateError(ConflictError):
    scim_type = "mutability"


class IdempotencyKeyReused(ConflictError):
    """The idempotency key names an earlier operation with a different request."""


class Outbound(NamedTuple):
    """How a domain knows an entity: its primary external ID, and the externalId it gave it.
    (A named tuple: a page makes one per ID, and a tuple is made in two thirds of the time of a
    frozen dataclass.)"""

    external_id: str
    domain_external_id: str | None


@dataclass(frozen=True)
class Operation:
    """A merge, split or reconciliation as the status resource shows it."""

    id: uuid.UUID
    kind: Literal["merge", "split", "reconcile"]
    idempotency_key: str
    request: dict[str, Any]
    state: str
    progress: dict[str, Any]
    actor: str
    created_at: datetime
    updated_at: datetime
    replayed: bool = False
    """True when the idempotency key named an existing operation and nothing was done."""

    @classmethod
    def from_record(cls, record: asyncpg.Record, *, replayed: bool = False) -> Operation:
        return cls(**dict(record.items()), replayed=replayed)


def _outbound_answers(
    looked: Iterable[asyncpg.Record], entities: Mapping[str, str | None], *, mint: bool
) -> tuple[list[tuple[str, str, Outbound]], set[str], set[str]]:
    """The read-only outbound lookup's rows, read once: the answers it holds (asked ID, the
    internal ID it resolved to, how the domain knows it), and what it left for the writing
    statement: the asked IDs with no primary row in the domain (when minting), and those to
    record (the broker has not seen the entity, or has seen it with no type and the caller knows
    it). A row is unpacked by position, in lookup_outbound's column order."""
    answers: list[tuple[str, str, Outbound]] = []
    to_mint: set[str] = set()
    to_record: set[str] = set()
    for asked, internal_id, known_type, external_id, domain_external_id, has_primary in looked:
        if known_type is None or (
            known_type == "unknown" and (entities[asked] or "unknown") != "unknown"
        ):
            to_record.add(asked)
        if mint and not has_primary:
            to_mint.add(asked)
        elif external_id is not None:
            answers.append((asked, internal_id, Outbound(external_id, domain_external_id)))
    return answers, to_mint, to_record


def _row(record: asyncpg.Record) -> MappingRow:
    return MappingRow(
        internal_id=record["internal_id"],
        domain=record["domain_id"],
        external_id=record["external_id"],
        primary=record["is_primary"],
        state=MappingState(record["state"]),
        origin=Origin(record["origin"]),
        row_id=record["id"],
    )


def _progress(tasks: Iterable[PeerTask]) -> dict[str, Any]:
    progress: dict[str, Any] = {}
    for task in tasks:
        if task.kind not in CANCEL_KINDS:
            entry = progress.setdefault(task.domain, {"state": "pending", "tasks": 0, "done": 0})
            entry["tasks"] += 1
    return progress


class MappingStore:
    """Batched access to the mapping table. Every method is one transaction."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        id_factory: Callable[[], str] = mint_id,
        cache: MappingCache | None = None,
    ) -> None:
        self.pool = pool
        self.id_factory = id_factory
        self.cache = cache or MappingCache()  # off until something listens for changes
        self._subscribed: tuple[bool, float] = (False, -_SUBSCRIBED_TTL * 2)

    # ------------------------------------------------------------------ translation

    async def resolve_inbound(self, domain: str, external_ids: Iterable[str]) -> dict[str, str]:
        """External IDs of ``domain`` -> internal IDs, in one query. Unknown IDs are absent."""
        return (await self.resolve_request(domain, external_ids))[0]

    async def resolve_outbound(
        self, domain: str, entities: Mapping[str, str | None], *, mint: bool
    ) -> dict[str, str]:
        """Internal IDs (-> resource type) -> the primary external IDs ``domain`` knows them by.

        One read however many IDs, and one writing statement for the IDs it left over. With
        ``mint``, entities the domain has no ID for get a pairwise minted one; without (a push peer's IDs are the ones it assigned), they are absent
        from the answer and the caller provisions them.
        """
        translated = await self.translate_outbound(domain, entities, mint=mint)
        return {internal: found.external_id for internal, found in translated.items()}

    async def translate_outbound(
        self, domain: str, entities: Mapping[str, str | None], *, mint: bool
    ) -> dict[str, Outbound]:
        """Like :meth:`resolve_outbound`, with the externalId ``domain`` gave each entity.

        A read-only lookup first (one indexed query, no write, no commit to wait for); the
        writing statement only for the entities it left over: those to mint for, and those to
        record (never seen, or seen with no type).
        """
        found: dict[str, Outbound] = self.cache.get_outbound(domain, entities)  # type: ignore[assignment]
        asked = [i for i in entities if i not in found]
        if not asked:
            return found
        generation = self.cache.generation
        looked = await self.pool.fetch(query("lookup_outbound"), domain, asked)
        answers, to_mint, to_record = _outbound_answers(looked, entities, mint=mint)
        if to_mint:
            answers += await self._mint_outbound(domain, to_mint | to_record, entities)
        elif to_record:
            # Learning that an entity exists (or its type) is a hint that the next read learns
            # again if a crash loses it: its commit does not wait for the disk (the statement
            # sets synchronous_commit off for itself). Anything written later that relies on the
            # row commits synchronously, which flushes this commit too.
            await self.pool.execute(
                query("record_seen_entities"),
                list(to_record),
                [entities[i] or "unknown" for i in to_record],
            )
        self.cache.put_outbound(generation, domain, answers)
        return found | {asked_id: value for asked_id, _, value in answers}

    async def _mint_outbound(
        self, domain: str, asked_ids: set[str], entities: Mapping[str, str | None]
    ) -> list[tuple[str, str, Outbound]]:
        """The writing statement of :meth:`translate_outbound`: record and mint for ``asked_ids``."""
        asked = sorted(asked_ids)
        if self.id_factory is mint_id:
            minted, handles = mint_ids(len(asked)), mint_ids(len(asked))
        else:
            minted = [self.id_factory() for _ in asked]
            handles = [self.id_factory() for _ in asked]
        types = [entities[i] or "unknown" for i in asked]
        args = (domain, asked, types, minted, handles, True)
        records = await self.pool.fetch(query("resolve_outbound"), *args)
        if len(records) < len(asked):
            # A concurrent request minted for the same entity first; its row is committed now.
            records = await self.pool.fetch(query("resolve_outbound"), *args)
        return [
            (r["asked"], r["internal_id"], Outbound(r["external_id"], r["domain_external_id"]))
            for r in records
        ]

    async def internal_ids_among(self, candidates: Collection[str]) -> set[str]:
        """Which of ``candidates`` (exact strings) are internal IDs the broker has recorded: the
        leak guard's exact lookup. Cache first, then one query for all the rest. A positive
        answer is kept for good (an internal ID never stops being one); a negative one is not,
        since the broker may record that entity a moment later, here or in another process."""
        known = self.cache.internal_ids.among(candidates)
        asked = [c for c in candidates if c not in known]
        if not asked:
            return known
        found = {
            r["internal_id"] for r in await self.pool.fetch(query("internal_ids_among"), asked)
        }
        self.cache.internal_ids.add(found)
        return known | found

    async def resolve_request(
        self, domain: str, external_ids: Iterable[str], external_id_values: Iterable[str] = ()
    ) -> tuple[dict[str, str], dict[str, list[str]]]:
        """What a request names, in one query: external IDs -> internal IDs, and the domain's
        externalId values -> the internal IDs of the entities it gave them to."""
        ids, values = list(dict.fromkeys(external_ids)), list(dict.fromkeys(external_id_values))
        resolved = self.cache.get_inbound(domain, ids)
        ids = [i for i in ids if i not in resolved]
        if not ids and not values:
            return resolved, {}
        generation = self.cache.generation
        records = await self.pool.fetch(query("resolve_request"), domain, ids, values)
        fresh: dict[str, str] = {}
        by_value: dict[str, list[str]] = {}
        for r in records:
            if r["kind"] == "id":
                fresh[r["key"]] = r["internal_id"]
            else:
                by_value.setdefault(r["key"], []).append(r["internal_id"])
        self.cache.put_inbound(generation, domain, fresh)
        return resolved | fresh, by_value

    async def events_subscribed(self) -> bool:
        """Whether any domain subscribes to SETs (then a write's result is worth reading back
        when home does not return it). Looked up at most every few seconds."""
        now = time.monotonic()
        if now - self._subscribed[1] > _SUBSCRIBED_TTL:
            self._subscribed = (
                bool(await self.pool.fetchval(query("events_subscribed"))),
                now,
            )
        return self._subscribed[0]

    async def subscribed(self, domain: str) -> bool:
        """Whether ``domain`` subscribes to SETs."""
        return bool(await self.pool.fetchval(query("subscription_exists"), domain))

    async def provision_on_need(self, domain: str, internal_ids: Sequence[str]) -> None:
        """Split-offs held back from push peer ``domain`` that something there needs now: a
        provisioning delivery each, unless one is on its way."""
        await self.pool.execute(query("provision_on_need"), domain, list(internal_ids))

    # ------------------------------------------------------------------ reading

    async def rows_of(self, internal_ids: Sequence[str]) -> list[MappingRow]:
        records = await self.pool.fetch(query("rows_of_entities"), list(internal_ids))
        return [_row(r) for r in records]

    async def rows_by_external(self, domain: str, external_id: str) -> list[MappingRow]:
        """All rows of the entity that ``domain:external_id`` denotes (none if it denotes nothing)."""
        records = await self.pool.fetch(query("rows_by_external"), domain, external_id)
        return [_row(r) for r in records]

    async def operation(self, operation_id: uuid.UUID) -> Operation:
        record = await self.pool.fetchrow(query("operation_by_id"), operation_id)
        if record is None:
            raise NotFoundError(f"there is no operation {operation_id}")
        return Operation.from_record(record)

    # ------------------------------------------------------------------ writing

    async def register_entities(self, entities: Mapping[str, str]) -> None:
        """Record internal IDs (-> resource type) the broker has seen in home."""
        await self.pool.execute(query("register_entities"), list(entities), list(entities.values()))

    async def add_mapping(
        self,
        internal_id: str,
        domain: str,
        external_id: str | None,
        *,
        origin: Origin = Origin.PEER,
        state: MappingState = MappingState.ACTIVE,
        domain_external_id: str | None = None,
    ) -> MappingRow:
        """Record a peer-assigned (or pending) primary ID of an entity in a domain."""
        primary = state in (MappingState.ACTIVE, MappingState.PENDING_CREATE)
        try:
            row_id = await self.pool.fetchval(
                query("insert_mapping"),
                internal_id,
                domain,
                external_id,
                primary,
                origin.value,
                state.value,
                domain_external_id,
                self.id_factory(),
            )
        except asyncpg.UniqueViolationError as exc:
            raise ConflictError(
                f"{domain} already has {'a primary ID for ' + internal_id if primary else external_id}"
                f" ({exc.constraint_name})"
            ) from exc
        except asyncpg.ForeignKeyViolationError as exc:
            raise NotFoundError(
                f"unknown entity {internal_id} or domain {domain}: register both first"
            ) from exc
        return MappingRow(internal_id, domain, external_id, primary, state, origin, row_id)

    async def merge(
        self,
        survivor: str,
        losers: Sequence[str],
        *,
        idempotency_key: str,
        actor: str,
    ) -> Operation:
        """Merge ``losers`` into ``survivor`` now; peers follow through the outbox."""
        request = {"survivor": survivor, "losers": list(losers)}
        plan = merge_planner(survivor, losers)
        return await self._run("merge", request, idempotency_key, actor, [survivor, *losers], plan)

    async def split(
        self,
        source: str,
        moves: Mapping[str, Sequence[tuple[str, str]]],
        *,
        idempotency_key: str,
        actor: str,
        provision: Literal["eager", "on_demand"] = "on_demand",
    ) -> Operation:
        """Split ``source`` into itself and the new entities of ``moves`` (new ID -> rows to move).

        The new entities are already created in home; the broker records them if it has not seen
        them yet.
        """
        request = {
            "source": source,
            "move": {new: [list(ref) for ref in refs] for new, refs in moves.items()},
            "provision": provision,
        }
        plan = split_planner(source, moves, provision)
        return await self._run("split", request, idempotency_key, actor, [source, *moves], plan)

    async def preview(self, involved: list[str], make_plan: Planner) -> Preview:
        """A dry run: the plan of a merge (:func:`merge_planner`) or split
        (:func:`split_planner`) of ``involved`` and the rows before and after, refused as the
        operation would be; the transaction is rolled back, so nothing changes."""
        async with self.pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                entities = await _lock_entities(conn, involved)
                plan = await make_plan(conn, entities)
                rows = await _locked_rows(conn, involved)
            finally:
                await transaction.rollback()
        return Preview(before=rows, after=apply_plan(rows, plan), plan=plan)

    async def _run(
        self,
        kind: Literal["merge", "split"],
        request: dict[str, Any],
        idempotency_key: str,
        actor: str,
        involved: list[str],
        make_plan: Planner,
    ) -> Operation:
        if not idempotency_key:
            raise InvalidValueError(
                "an idempotency key is required, so that a retry cannot apply twice"
            )
        op_id = uuid.uuid4()
        async with self.pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetchval(
                query("claim_operation"), op_id, kind, idempotency_key, request, actor
            )
            if claimed is None:
                return await _replay(conn, kind, request, idempotency_key)
            entities = await _lock_entities(conn, involved)
            plan: Plan = await make_plan(conn, entities)
            await _apply(conn, plan, op_id, entities[involved[0]]["resource_type"])
            progress = _progress(plan.tasks)
            record = await conn.fetchrow(
                query("finish_planning"), op_id, "propagating" if progress else "done", progress
            )
            await conn.execute(
                query("audit"),
                actor,
                kind,
                involved[0],
                {
                    "operation": str(op_id),
                    "request": request,
                    "rows_changed": len(plan.changes),
                    "tasks": [_task_payload(t) | {"kind": t.kind.value} for t in plan.tasks],
                },
            )
            await conn.execute(
                query("history_operation"),
                kind,
                op_id,
                request,
                involved,
                _roles(kind, len(involved)),
                len(plan.changes),
            )
            assert record is not None, "the operation was claimed in this transaction"
        # Committed: this process forgets at once what it cached (others hear from the trigger).
        self.cache.clear()
        return Operation.from_record(record)


Planner = Callable[["Connection", dict[str, asyncpg.Record]], Awaitable[Plan]]
"""Checks the locked entities and returns the plan (it may record split-offs not seen yet)."""


@dataclass(frozen=True)
class Preview:
    """What a merge or split would do: the mapping rows of the entities before and after, and
    the plan (its ``tasks`` are what each peer would be asked)."""

    before: list[MappingRow]
    after: list[MappingRow]
    plan: Plan


def merge_planner(survivor: str, losers: Sequence[str]) -> Planner:
    """The planning step of a merge of ``losers`` into ``survivor``."""

    async def plan(conn: Connection, entities: dict[str, asyncpg.Record]) -> Plan:
        _require_live(entities, [survivor, *losers])
        _require_same_type(entities, survivor, losers)
        rows = await _locked_rows(conn, [survivor, *losers])
        push = {r["id"] for r in await conn.fetch(query("push_domains"))}
        return plan_merge(survivor, losers, rows, push_domains=push)

    return plan


def split_planner(
    source: str,
    moves: Mapping[str, Sequence[tuple[str, str]]],
    provision: Literal["eager", "on_demand"],
) -> Planner:
    """The planning step of a split of ``source`` (new entities not seen yet are recorded)."""
    new_ids = list(moves)

    async def plan(conn: Connection, entities: dict[str, asyncpg.Record]) -> Plan:
        _require_live(entities, [source])
        unseen = [new for new in new_ids if new not in entities]
        if unseen:
            resource_type = entities[source]["resource_type"]
            await conn.execute(query("register_entities"), unseen, [resource_type] * len(unseen))
            entities.update(await _lock_entities(conn, unseen))
        _require_live(entities, new_ids)
        _require_same_type(entities, source, new_ids)
        rows = await _locked_rows(conn, [source, *new_ids])
        push = {r["id"] for r in await conn.fetch(query("push_domains"))}
        return plan_split(source, moves, rows, push_domains=push, provision=provision)

    return plan


def _roles(kind: str, involved: int) -> list[str]:
    """What each entity involved was: the first is the survivor (or the source)."""
    if kind == "merge":
        return ["survivor"] + ["loser"] * (involved - 1)
    return ["source"] + ["new"] * (involved - 1)


async def _replay(conn: Connection, kind: str, request: dict[str, Any], key: str) -> Operation:
    record = await conn.fetchrow(query("operation_by_key"), key)
    assert record is not None, "claim_operation returned nothing, so the key exists"
    if record["kind"] != kind or record["request"] != request:
        raise IdempotencyKeyReused(
            f"idempotency key {key!r} was used for another request ({record['kind']} "
            f"{record['request']}); use a new key for a new operation"
        )
    return Operation.from_record(record, replayed=True)


async def _lock_entities(conn: Connection, ids: list[str]) -> dict[str, asyncpg.Record]:
    records = await conn.fetch(query("lock_entities"), ids)
    return {r["internal_id"]: r for r in records}


async def _locked_rows(conn: Connection, ids: list[str]) -> list[MappingRow]:
    await conn.execute(query("lock_rows"), ids)
    return [_row(r) for r in await conn.fetch(query("rows_of_entities"), ids)]


def _require_live(entities: Mapping[str, asyncpg.Record], ids: Iterable[str]) -> None:
    for internal_id in ids:
        entity = entities.get(internal_id)
        if entity is None:
            raise UnknownEntity(
                f"the broker has never seen entity {internal_id}: check the ID, "
                "or let a domain read it through the broker first"
            )
        if entity["state"] == "merged":
            raise EntityStateError(
                f"entity {internal_id} was merged into {entity['merged_into']}: "
                f"use {entity['merged_into']} instead"
            )
        if entity["state"] != "active":
            raise EntityStateError(f"entity {internal_id} is {entity['state']}, not active")


def _require_same_type(
    entities: Mapping[str, asyncpg.Record], first: str, others: Iterable[str]
) -> None:
    expected = entities[first]["resource_type"]
    for other in others:
        if entities[other]["resource_type"] != expected:
            raise InvalidValueError(
                f"{other} is a {entities[other]['resource_type']} and {first} a {expected}: "
                "only entities of one resource type can be merged or split"
            )


def _task_payload(task: PeerTask) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    if task.external_id is not None:
        payload["external_id"] = task.external_id
    if task.target_external_id is not None:
        payload["target_external_id"] = task.target_external_id
    return payload


async def _apply(conn: Connection, plan: Plan, op_id: uuid.UUID, resource_type: str) -> None:
    """Write a plan, and nothing it does not say: entities held back and their syncs, rows,
    copies, handovers, group resyncs, merges, outbox rows, cancellations and identity notices,
    on the caller's transaction."""
    for flag in (True, False):
        held = [entity for entity, on_demand in plan.hold_back.items() if on_demand is flag]
        if held:
            await conn.execute(query("hold_back"), held, flag)
    now = datetime.now(UTC)
    for domain in dict.fromkeys(domain for domain, _ in plan.syncs):
        entities = [entity for d, entity in plan.syncs if d == domain]
        await conn.execute(query("enqueue_sync_to"), domain, entities, now)
    await _apply_rows(conn, plan, op_id)
    if plan.copies_dropped:
        await conn.execute(
            query("rows_moved"),
            [c.domain for c in plan.copies_dropped],
            [c.before for c in plan.copies_dropped],
            [c.after for c in plan.copies_dropped],
        )
    if plan.handovers:
        await conn.execute(
            query("enqueue_handover"),
            [h.domain for h in plan.handovers],
            [h.internal_id for h in plan.handovers],
            [h.previous for h in plan.handovers],
        )
    if plan.regroup:
        await conn.execute(
            query("resync_groups_naming"),
            [domain for domain, _ in plan.regroup],
            [external_id for _, external_id in plan.regroup],
        )
    if plan.merged:
        survivors = set(plan.merged.values())
        assert len(survivors) == 1, "one merge has one survivor"
        await conn.execute(query("mark_merged"), survivors.pop(), list(plan.merged))
    deliveries = plan.deliveries
    if deliveries:
        await conn.execute(
            query("enqueue_tasks"),
            op_id,
            [t.domain for t in deliveries],
            [t.internal_id for t in deliveries],
            [t.kind.value for t in deliveries],
            [_task_payload(t) for t in deliveries],
        )
    await _cancel(conn, plan)
    if plan.notices:
        await conn.execute(
            query("record_identity_notices"), [_notice(n, resource_type) for n in plan.notices]
        )


async def _apply_rows(conn: Connection, plan: Plan, op_id: uuid.UUID) -> None:
    """The plan's row changes (creates still on their way undone first)."""
    if not plan.changes:
        return
    ids, owners, primaries, states = [], [], [], []
    for change in plan.changes:
        assert change.before.row_id is not None, "the store only plans over rows it loaded"
        ids.append(change.before.row_id)
        owners.append(change.after.internal_id if change.after else None)
        primaries.append(change.after.primary if change.after else None)
        states.append(change.after.state.value if change.after else None)
    if plan.undo_creates:
        await conn.execute(query("undo_creates"), [r.row_id for r in plan.undo_creates], op_id)
    await conn.execute(query("apply_row_changes"), ids, owners, primaries, states)


async def _cancel(conn: Connection, plan: Plan) -> None:
    """The deliveries the plan makes unwanted, cancelled; earlier operations whose clean-up is
    no longer wanted show it in their progress."""
    cancels = plan.cancels
    if cancels:
        cancelled = await conn.fetch(
            query("cancel_tasks"),
            [t.kind.value for t in cancels],
            [t.domain for t in cancels],
            [t.internal_id for t in cancels],
            [t.external_id for t in cancels],
        )
        # Earlier operations whose clean-up is no longer wanted show it in their progress.
        for earlier in sorted({r["operation_id"] for r in cancelled} - {None}):
            await conn.execute(query("lock_operation"), earlier)
            await conn.execute(query("refresh_operation"), earlier)


def _notice(notice: IdentityNotice, resource_type: str) -> dict[str, Any]:
    """A plan's identity notice as ``record_identity_notices`` stores it."""
    document: dict[str, Any] = {
        "domain": notice.domain,
        "resource_type": resource_type,
        "id": notice.external_id,
        "primary": notice.primary,
    }
    if notice.kind == "split":
        document["from"] = notice.split_from
    return {"internal_id": notice.internal_id, "kind": notice.kind, "document": document}


async def set_domain_external_ids(
    conn: Connection, origin: str, values: Mapping[str, str | None]
) -> None:
    """The externalId ``origin`` gave each entity (None: cleared), kept on its primary row in
    that domain (DESIGN section 3: shown back to that domain only), on ``conn``'s transaction."""
    await conn.executemany(
        query("set_domain_external_id"), [(origin, i, value) for i, value in values.items()]
    )
