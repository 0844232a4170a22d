"""A ``sync`` delivery (or a ``provision``: the same, for a split-off held back until needed):
make a peer's copy of an entity match home's current state.

It is state-based: it reads home's current resource when it runs and brings the peer to it
(create, the smallest PATCH, or deprovision), so a retry, a replay after a crash, or two syncs of
one entity in a row all converge on the same result and nothing is applied twice in effect. Each
step reads what it needs, asks ``decisions`` what to do, and does it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import asyncpg
import orjson

from broker.db import query
from broker.home import HomeSchema
from broker.http import Answer
from broker.mapping import accounts
from broker.mapping.guard import LeakGuard
from broker.mapping.store import mint_id
from broker.propagation.decisions import (
    DELETED,
    SUSPEND_PATCH,
    Created,
    DropPending,
    Link,
    Row,
    Suspend,
    WaitSuspended,
    copy_outcome,
    create_answer,
    deprovision_step,
    in_scope,
    link_target,
    park,
    patient,
    plan_update,
    sort_references,
    sync_skipped,
    unique_value,
    users_to_scope,
)
from broker.propagation.delivery import Claim, Later, Peer, copy_is_stale, home_call
from broker.propagation.documents import PATCH_SCHEMA, peer_document
from broker.propagation.peer import PeerClient
from broker.propagation.policy import Failure, Verdict, judge
from broker.propagation.records import Batcher, Record, Recorder, batchable
from broker.propagation.tools import Tools
from broker.scim.rewrite import Translation, collect_ids
from broker.secrets import SealError, SecretBox

__all__ = ["Deprovisions", "HomeReads", "Syncer", "Write", "Writes"]

log = logging.getLogger(__name__)

_HOME_READS_KEPT = 1024


@dataclass
class _HomeRead:
    """A read of one resource from home, shared by the deliveries it is fresh enough for."""

    started: float
    """When (monotonic) the GET was sent."""
    answer: asyncio.Future[dict[str, Any] | None]


class HomeReads:
    """Home's resources as the deliveries read them: one read serves the deliveries of one
    change to several peers."""

    def __init__(self, tools: Tools) -> None:
        self.home = tools.home
        self.monotonic = tools.monotonic
        self._reads: dict[str, _HomeRead] = {}
        """The latest read from home of each entity (the oldest dropped past a bound)."""
        self.sent = 0
        """GETs sent to home so far (how well the reads are shared: ``bench/deliveries.py``)."""

    async def resource(
        self, endpoint: str, internal_id: str, fresh_since: float
    ) -> dict[str, Any] | None:
        """Home's resource (None: gone), read once for the deliveries of one change to several
        peers: a read sent after ``fresh_since`` (this delivery's claim) shows every write the
        delivery stands for, so its answer serves here too. Nothing changes the documents."""
        read = self._reads.get(internal_id)
        if read is not None and read.started >= fresh_since:
            return await asyncio.shield(read.answer)
        read = _HomeRead(self.monotonic(), asyncio.get_running_loop().create_future())
        self.sent += 1
        self._reads.pop(internal_id, None)
        self._reads[internal_id] = read
        if len(self._reads) > _HOME_READS_KEPT:
            del self._reads[next(iter(self._reads))]
        try:
            read.answer.set_result(await self._read(endpoint, internal_id))
        except asyncio.CancelledError:
            read.answer.cancel()
            raise
        except Exception as exc:
            if self._reads.get(internal_id) is read:
                del self._reads[internal_id]
            read.answer.set_exception(exc)
            read.answer.exception()  # retrieved: the deliveries sharing it raise it themselves
            raise
        return read.answer.result()

    async def _read(self, endpoint: str, internal_id: str) -> dict[str, Any] | None:
        response = await home_call(self.home.request("GET", f"{endpoint}/{internal_id}"))
        if response.status == 404:
            return None
        if response.status != 200 or not isinstance(response.body, dict):
            raise Failure(
                Verdict.TRANSIENT,
                f"home answered HTTP {response.status} for the entity; retrying",
                peer_fault=False,
            )
        body: dict[str, Any] = response.body
        return body


@dataclass(frozen=True)
class Write:
    """One write of an entity to a peer: where, and what the peer should hold."""

    peer: Peer
    client: PeerClient
    claim: Claim
    endpoint: str
    resource_type: str
    desired: dict[str, Any]
    """The peer's document: home's state, translated and filtered for the peer."""
    write_only: Mapping[str, Any]
    """Values the write carries but the copy never keeps (a password)."""
    views: Mapping[str, str]
    """The peer's IDs of what the document refers to (entity -> account), as translated."""

    @property
    def handle(self) -> str:
        """The correlation handle the document carries as its externalId."""
        handle: str = self.desired["externalId"]
        return handle

    @property
    def body(self) -> dict[str, Any]:
        """The whole resource, write-only values included (a POST or a PUT)."""
        return {**self.desired, **self.write_only}


class Syncer:
    """Reads home's state of the entity and what the peer holds, and hands the peer's document
    to the create, the update or the deprovision."""

    def __init__(
        self,
        tools: Tools,
        *,
        guard: LeakGuard,
        box: Callable[[], SecretBox] | None = None,
    ) -> None:
        self.tools = tools
        self.pool = tools.pool
        self.home = tools.home
        self.guard = guard
        self.box = box
        self.reads = HomeReads(tools)
        self.writes = Writes(tools)
        self.deprovisions = Deprovisions(tools)
        self.starts: Batcher[tuple[str, str, str], str | None] = Batcher(
            self._begin_together, self._begin_alone, what="creates begun"
        )
        """Creates begun together write their pending rows in one statement."""

    async def sync(self, peer: Peer, claim: Claim) -> None:
        """Make the peer's copy of the entity match home's current state."""
        client = self.tools.clients(peer)
        entity: Mapping[str, Any] | None = claim.entity
        if entity is None:
            row = await self.pool.fetchrow(query("entity_for_delivery"), peer.id, claim.internal_id)
            entity = dict(row) if row is not None else None
        assert entity is not None, "outbox rows reference entities"
        if sync_skipped(
            kind=claim.kind,
            state=entity["state"],
            provision_on_demand=entity["provision_on_demand"],
            known_here=entity["known_here"],
        ):
            return
        schema = await home_call(self.home.schema())
        resource_type = entity["resource_type"]
        endpoint = schema.endpoints.by_type.get(resource_type)
        home_doc = await self._home_state(peer, claim, entity, endpoint)
        if home_doc is None:
            await self.deprovisions.deprovision(peer, client, claim, entity, endpoint)
            return
        assert endpoint is not None
        translation = Translation(
            schema.refs, schema.endpoints, self.home.base_url, client.base_url
        )
        views = await self._references(peer, claim, home_doc, translation, resource_type, schema)
        handle = entity["correlation_handle"]
        first_attempt = False
        if entity["external_id"] is None:
            handle, first_attempt = await self._begin_create(peer, claim.internal_id)
        desired = peer_document(
            home_doc,
            translation,
            lambda internal, _t: views.get(internal),
            resource_type=resource_type,
            correlation_handle=handle,
            readable=peer.readable,
        )
        await self._guard(desired, {claim.internal_id, *views})
        write = Write(
            peer, client, claim, endpoint, resource_type, desired, self._open(claim), views
        )
        if entity["external_id"] is None:
            await self.writes.create(write, first_attempt)
        else:
            await self.writes.update(write, entity)

    async def _home_state(
        self, peer: Peer, claim: Claim, entity: Mapping[str, Any], endpoint: str | None
    ) -> dict[str, Any] | None:
        """Home's resource as the peer may see it: None when home has it no more, or it is out
        of the peer's scope."""
        if endpoint is None or entity["state"] != "active":
            return None
        home_doc = await self.reads.resource(endpoint, claim.internal_id, claim.claimed_at)
        if home_doc is not None and peer.scope_filter and entity["resource_type"] == "User":
            within = await home_call(
                self.home.ids_within(endpoint, [claim.internal_id], peer.scope_filter)
            )
            home_doc = home_doc if claim.internal_id in within else None
        return home_doc

    def _open(self, claim: Claim) -> dict[str, Any]:
        """The write-only values the delivery carries (never logged, never kept in the copy)."""
        if claim.sealed_values is None:
            return {}
        if self.box is None:
            raise Failure(
                Verdict.PERMANENT, "the delivery carries a password but this worker has no key"
            )
        try:
            return self.box().open(claim.sealed_values)
        except SealError as exc:
            raise Failure(Verdict.PERMANENT, str(exc), peer_fault=False) from None

    async def _references(
        self,
        peer: Peer,
        claim: Claim,
        home_doc: Mapping[str, Any],
        translation: Translation,
        resource_type: str,
        schema: HomeSchema,
    ) -> dict[str, str]:
        """The peer's IDs of everything the resource refers to. A member not yet created in the
        peer is enqueued and this delivery waits for it; one whose delivery was tried and did not
        create it (out of scope, gone from home, dead-lettered) is left out."""
        named = collect_ids(dict(home_doc), translation, resource_type=resource_type)
        named.pop(claim.internal_id, None)
        if not named:
            return {}
        users = users_to_scope(named) if peer.scope_filter else []
        if users:
            within = await home_call(
                self.home.ids_within(
                    schema.endpoints.by_type.get("User", "/Users"), users, peer.scope_filter
                )
            )
            named = in_scope(named, within)
        references = sort_references(await self.pool.fetch(query("peer_ids"), peer.id, list(named)))
        if references.untried:
            await self._provision(peer, references.untried, named)
        if references.pending:
            raise Later(
                self.tools.settings.dependency_wait,
                f"waiting for {references.pending} referenced resources to be created first",
            )
        return references.views

    async def _provision(
        self,
        peer: Peer,
        untried: list[Row],
        named: Mapping[str, str | None],
    ) -> None:
        """Referenced entities never delivered to the peer are recorded and provisioned there."""
        async with self.pool.acquire() as conn, conn.transaction():
            await accounts.record_entities(
                conn,
                [r["internal_id"] for r in untried],
                [named[r["internal_id"]] or "unknown" for r in untried],
            )
            # A merged member is provisioned as its survivor, whose account it would name
            # (a provisioning of the merged entity itself would do nothing, for ever).
            await conn.execute(
                query("enqueue_provision"),
                peer.id,
                list(dict.fromkeys(r["target"] for r in untried)),
            )

    async def _guard(self, document: Any, in_play: set[str]) -> None:
        """Fail closed: nothing the peer receives may hold an internal ID (in play here, or any
        the broker knows). What a domain wrote into a text attribute is not one."""
        leak = await self.guard.check([("body", orjson.dumps(document).decode())], in_play=in_play)
        if leak is not None:
            raise Failure(
                Verdict.PERMANENT,
                f"withheld: the document for the peer would expose an internal identifier "
                f"({leak.reason}, in {leak.where}); check home's data for IDs in free text",
                peer_fault=False,
            )

    async def _begin_create(self, peer: Peer, internal_id: str) -> tuple[str, bool]:
        """The create's correlation handle, and whether this is its first attempt."""
        fresh = await self.starts.submit((internal_id, peer.id, mint_id()))
        if fresh is not None:
            return fresh, True
        row = await self.pool.fetchrow(query("pending_handle"), internal_id, peer.id)
        if row is None or row["state"] != "pending_create":
            # A merge or split gave the entity an account here meanwhile (or it is gone).
            raise Later(0, "the entity's primary in the peer changed meanwhile: looking again")
        handle: str = row["correlation_handle"]
        return handle, False

    async def _begin_together(self, creates: list[tuple[str, str, str]]) -> list[str | None]:
        fresh = await accounts.begin_creates(self.pool, creates)
        return [handle if handle in fresh else None for _, _, handle in creates]

    async def _begin_alone(self, create: tuple[str, str, str]) -> str | None:
        return await accounts.begin_create(self.pool, *create)


class Writes:
    """The create and the update of an entity's account in a peer, and what a peer's refusal
    with 409 sets going."""

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self.pool = tools.pool
        self.settings = tools.settings
        self.ledger = tools.ledger
        self.recorder = Recorder(tools.pool, tools.ledger)

    # ------------------------------------------------------------------ create

    async def create(self, write: Write, first_attempt: bool) -> None:
        """Create the account (or find what a lost answer made, or link to the peer's own),
        record it, and undo it if a merge cancelled the create meanwhile."""
        client, endpoint = write.client, write.endpoint
        # A create whose answer was lost left the resource in the peer under the handle; on the
        # first attempt there can be none.
        found = [] if first_attempt else await client.find_by(endpoint, "externalId", write.handle)
        linked = False
        if found:
            peer_id = found[0]
        else:
            made = await self._post(write)
            if made is None:
                return  # a merge or split cancelled it meanwhile: nothing to do
            peer_id, linked = made
        if (linked or found) and not await self._put_existing(write, peer_id):
            return  # a merge or split cancelled it meanwhile (its undo_create follows)
        owner = await self._record_create(write, peer_id, linked)
        if owner is None and not linked:
            # A merge cancelled the create while it was on its way (the survivor already has an
            # account there): the resource it made goes again, so the peer holds the entity once.
            log.info("delivery to %s: a create cancelled by a merge is undone", write.peer.id)
            answer = await client.call("DELETE", f"{endpoint}/{peer_id}")
            if answer.status not in DELETED:
                raise judge(answer.status, answer.body, answer.headers, f"DELETE {endpoint}/...")

    async def _post(self, write: Write) -> tuple[str, bool] | None:
        """POST the resource: the peer's ID and whether it is linked (the peer's own account
        holding the unique value); None when the create is no longer wanted."""
        client, endpoint = write.client, write.endpoint
        answer = await client.call("POST", endpoint, body=write.body)
        outcome = create_answer(
            answer.status,
            answer.body,
            on_conflict=write.peer.on_conflict,
            resource_type=write.resource_type,
        )
        if isinstance(outcome, Created):
            return outcome.peer_id, False
        if isinstance(outcome, Link):
            key = outcome.key
            matches = (
                await client.find_by(endpoint, key, write.desired[key])
                if key in write.desired
                else []
            )
            target = link_target(matches)
            if target is None:
                raise judge(answer.status, answer.body, answer.headers, f"POST {endpoint}")
            return target, True
        if outcome.no_id:
            raise Failure(Verdict.PERMANENT, f"POST {endpoint}: the peer's answer has no id")
        if not await self._create_wanted(write):
            return None
        await self._refused(write, answer, f"POST {endpoint}", None)

    async def _put_existing(self, write: Write, peer_id: str) -> bool:
        """What exists there is what an earlier attempt sent, or the peer's own: it is brought
        to home's state now, as the copy recorded after says. False: the create is no longer
        wanted."""
        endpoint = write.endpoint
        answer = await write.client.call("PUT", f"{endpoint}/{peer_id}", body=write.body)
        if answer.status == 200:
            return True
        if not await self._create_wanted(write):
            return False
        await self._refused(write, answer, f"PUT {endpoint}/...", peer_id)

    async def _record_create(self, write: Write, peer_id: str, linked: bool) -> str | None:
        """The account is the entity's primary now, with its copy; the entity it belongs to
        (None: a merge cancelled the create). Recorded with the other deliveries finishing now
        when it can be (``records``)."""
        if not batchable(write.claim, write.views):
            return await self._record_create_alone(write, peer_id, linked)
        owner: str | None = await self.recorder.record(
            Record(
                write.peer.id,
                write.claim,
                write.desired,
                lambda: self._record_create_alone(write, peer_id, linked),
                created=True,
                account=peer_id,
                handle=write.handle,
                linked=linked,
            )
        )
        return owner

    async def _record_create_alone(self, write: Write, peer_id: str, linked: bool) -> str | None:
        """``_record_create`` in a transaction of its own."""
        peer, claim = write.peer, write.claim
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                stale = await copy_is_stale(conn, peer.id, claim.internal_id, write.views)
                # The row is found by its handle: a merge may have moved it to its survivor.
                owner = await accounts.finish_create(conn, write.handle, peer.id, peer_id)
                if owner is not None:
                    await conn.execute(query("save_copy"), peer.id, owner, write.desired, None)
                    if stale:
                        await conn.execute(
                            query("enqueue_sync_to"), peer.id, [owner], self.tools.now()
                        )
                if owner is not None or linked:
                    await self.ledger.done_with(conn, claim)
        except asyncpg.UniqueViolationError as exc:
            raise Failure(
                Verdict.PERMANENT,
                f"the peer's resource {peer_id} is already mapped to another entity; "
                "merge the two entities, or remove the duplicate in the peer",
                peer_fault=False,
            ) from exc
        return owner

    async def _create_wanted(self, write: Write) -> bool:
        """Whether the create is still wanted (its pending row is there)."""
        state = await self.pool.fetchval(query("create_state"), write.handle, write.peer.id)
        return bool(state == "pending_create")

    # ------------------------------------------------------------------ update

    async def update(self, write: Write, entity: Mapping[str, Any]) -> None:
        """Bring the account to home's state: the smallest PATCH from what the peer last
        received, or a PUT; a peer that lost the account has it created again."""
        peer, client, endpoint = write.peer, write.client, write.endpoint
        peer_id = entity["external_id"]
        plan = plan_update(
            entity["copy"],
            write.desired,
            suspended=entity["suspended_at"] is not None,
            write_only=write.write_only,
        )
        if plan is None:
            return  # the peer holds what home holds
        if plan.patch is not None and await client.supports_patch():
            body: dict[str, Any] = {"schemas": [PATCH_SCHEMA], "Operations": plan.patch}
            answer = await client.call("PATCH", f"{endpoint}/{peer_id}", body=body)
            what = f"PATCH {endpoint}/..."
        else:
            answer = await client.call("PUT", f"{endpoint}/{peer_id}", body=plan.put)
            what = f"PUT {endpoint}/..."
        if answer.status == 404:
            # The peer lost it: forget the row, and create it again on the next attempt.
            async with self.pool.acquire() as conn, conn.transaction():
                await accounts.retire_primary(
                    conn, write.claim.internal_id, peer.id, self.settings.retention
                )
                await conn.execute(query("drop_copy"), peer.id, write.claim.internal_id)
                await conn.execute(query("resync_groups_naming"), [peer.id], [peer_id])
            raise Later(0, "the peer no longer has the resource: creating it again")
        if answer.status not in (200, 204):
            await self._refused(write, answer, what, peer_id)
        await self._record_update(write, entity)

    async def _record_update(self, write: Write, entity: Mapping[str, Any]) -> None:
        """What the peer holds now recorded as its copy, and the delivery settled, with the
        other deliveries finishing now when it can be (``records``)."""
        if not batchable(write.claim, write.views):
            await self._record_update_alone(write, entity)
            return
        await self.recorder.record(
            Record(
                write.peer.id,
                write.claim,
                write.desired,
                lambda: self._record_update_alone(write, entity),
                created=False,
                account=entity["external_id"],
                version=entity["copy_version"],
            )
        )

    async def _record_update_alone(self, write: Write, entity: Mapping[str, Any]) -> None:
        peer, internal_id = write.peer, write.claim.internal_id
        async with self.pool.acquire() as conn, conn.transaction():
            stale = await copy_is_stale(conn, peer.id, internal_id, write.views)
            # The copy the write was computed from may have changed on its way (a merge's
            # membership move wrote to the same group, a value was parked aside): what the peer
            # holds is then not known, and the entity is synced again from no copy (a PUT).
            recorded = await conn.fetchval(
                query("save_copy_of"),
                peer.id,
                internal_id,
                write.desired,
                None,
                entity["external_id"],
                entity["copy_version"],
            )
            drop, resync = copy_outcome(stale=stale, recorded=bool(recorded))
            if drop:
                await conn.execute(query("drop_copy"), peer.id, internal_id)
            if resync:
                await conn.execute(
                    query("enqueue_sync_to"), peer.id, [internal_id], self.tools.now()
                )
            await self.ledger.done_with(conn, write.claim)

    # ------------------------------------------------------------------ conflicts

    async def _refused(
        self, write: Write, answer: Answer, what: str, account: str | None
    ) -> NoReturn:
        """The peer refused the write: a 409 first frees the value if an account of the
        broker's holds it, and is retried for ``conflict_patience`` before it is dead."""
        failure = judge(answer.status, answer.body, answer.headers, what)
        if answer.status == 409:
            await self._unblock(write, account)
        raise patient(
            failure,
            conflict_since=write.claim.conflict_since,
            now=self.tools.clock(),
            patience=self.settings.conflict_patience,
        )

    async def _unblock(self, write: Write, account: str | None) -> None:
        """A write refused with 409: if another account of the broker's holds the unique value
        (accounts that changed hands can hold each other's values, a cycle no order of writes
        can break), that account's value is parked aside and its own sync set to run again.
        An alias waiting for its delete counts too: its delete may be queued behind this very
        write (the alias of the entity being written), so waiting for it would never end."""
        unique = unique_value(write.resource_type, write.desired)
        if unique is None:
            return
        key, value = unique
        peer, client, endpoint = write.peer, write.client, write.endpoint
        for holder in await client.find_by(endpoint, key, value):
            if holder == account or not await self.pool.fetchval(
                query("broker_account"), peer.id, holder
            ):
                continue  # not the broker's account: a person decides (dead letter later)
            log.info("delivery to %s: %s of account %s parked to free it", peer.id, key, holder)
            answer = await client.call(
                "PATCH", f"{endpoint}/{holder}", body=park(key, value, holder)
            )
            if answer.status in (200, 204):
                await self._parked(peer.id, holder)

    async def _parked(self, peer_id: str, holder: str) -> None:
        """After a value of account ``holder`` was parked aside: its owner now (an alias waiting
        for its delete has none; it may have changed hands meanwhile) gets its own values back.

        Its copy is marked unknown, not deleted: a write of the owner's may be on its way,
        computed from no copy, and sent before the park landed. Recording over a deleted copy
        it would find nothing changed, and the sync queued here would then find the peer
        holding what home holds, leaving the parked value in place; over an unknown copy it
        finds the copy changed, and the owner is synced again from no copy (a PUT)."""
        async with self.pool.acquire() as conn, conn.transaction():
            owner = await conn.fetchval(query("account_owner"), peer_id, holder)
            if owner is not None:
                await conn.execute(query("forget_copy"), peer_id, owner)
                await conn.execute(query("enqueue_sync_to"), peer_id, [owner], self.tools.now())


class Deprovisions:
    """Home no longer has the entity (or the peer may no longer see it): its account is
    suspended, then deleted, or deleted at once, as the peer's ``deprovision`` says."""

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self.pool = tools.pool
        self.settings = tools.settings

    async def deprovision(
        self,
        peer: Peer,
        client: PeerClient,
        claim: Claim,
        entity: Mapping[str, Any],
        endpoint: str | None,
    ) -> None:
        now = self.tools.now()
        step = deprovision_step(
            external_id=entity["external_id"],
            endpoint_known=endpoint is not None,
            mapping_state=entity["mapping_state"],
            policy=peer.deprovision,
            suspended_at=entity["suspended_at"],
            suspend_for=peer.suspend_for,
            now=now,
        )
        if isinstance(step, DropPending):
            if step.undo:
                assert endpoint is not None
                # A create was tried and its answer lost: what it made there goes again.
                await _delete_made(client, endpoint, entity["correlation_handle"])
            # Drop the pending create, if any.
            await accounts.retire_primary(
                self.pool, claim.internal_id, peer.id, self.settings.retention
            )
            return
        assert endpoint is not None
        account = f"{endpoint}/{entity['external_id']}"
        if isinstance(step, Suspend):
            answer = await client.call("PATCH", account, body=SUSPEND_PATCH)
            if answer.status not in DELETED:
                raise judge(answer.status, answer.body, answer.headers, f"PATCH {endpoint}/...")
            async with self.pool.acquire() as conn, conn.transaction():
                suspended = {**(entity["copy"] or {}), "active": False}
                await conn.execute(
                    query("save_copy"), peer.id, claim.internal_id, suspended, step.at
                )
                await conn.execute(
                    query("enqueue_sync_to"), peer.id, [claim.internal_id], step.delete_at
                )
            return
        if isinstance(step, WaitSuspended):
            await self.pool.execute(
                query("enqueue_sync_to"), peer.id, [claim.internal_id], step.until
            )
            return
        await self._delete(peer, client, claim, endpoint, entity["external_id"])

    async def _delete(
        self, peer: Peer, client: PeerClient, claim: Claim, endpoint: str, peer_id: str
    ) -> None:
        answer = await client.call("DELETE", f"{endpoint}/{peer_id}")
        if answer.status not in DELETED:
            raise judge(answer.status, answer.body, answer.headers, f"DELETE {endpoint}/...")
        async with self.pool.acquire() as conn, conn.transaction():
            await accounts.retire_primary(conn, claim.internal_id, peer.id, self.settings.retention)
            await conn.execute(query("drop_copy"), peer.id, claim.internal_id)
            # Not every peer drops a deleted member from its groups: the broker's groups that
            # named it are synced again.
            await conn.execute(query("resync_groups_naming"), [peer.id], [peer_id])


async def _delete_made(client: PeerClient, endpoint: str, handle: str) -> None:
    """DELETE what creates under correlation handle ``handle`` made in the peer."""
    for made in await client.find_by(endpoint, "externalId", handle):
        answer = await client.call("DELETE", f"{endpoint}/{made}")
        if answer.status not in DELETED:
            raise judge(answer.status, answer.body, answer.headers, f"DELETE {endpoint}/...")
