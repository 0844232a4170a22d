"""A merge's and a split's clean-up in a peer: the groups holding an alias come to hold the
survivor's primary (``move_memberships``), the alias is deleted (``delete_alias``), and what a
cancelled create made goes again (``undo_create``). A split-off held back until needed is created
by a ``provision`` delivery, which is a sync (``broker.propagation.sync``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.db import query
from broker.mapping import accounts
from broker.propagation.decisions import DELETED, follow_move, membership_move
from broker.propagation.delivery import Claim, Later, Peer, copy_is_stale, home_call
from broker.propagation.documents import PATCH_SCHEMA
from broker.propagation.policy import Failure, Verdict, judge
from broker.propagation.tools import Tools

if TYPE_CHECKING:
    import asyncpg

    from broker.propagation.peer import PeerClient

__all__ = ["Cleanup"]


class Cleanup:
    """The deliveries of kinds ``move_memberships``, ``delete_alias``, ``undo_create`` and
    ``delete_orphan``."""

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self.pool = tools.pool
        self.home = tools.home

    async def _alias_endpoint(
        self, peer: Peer, claim: Claim
    ) -> tuple[str, str, asyncpg.Record | None] | None:
        """The alias the task acts on, its endpoint and the survivor as the peer has it, or None
        when the alias no longer waits for its delete (a split moved it back, or the task ran)."""
        alias = claim.payload.get("external_id")
        if not isinstance(alias, str):
            raise Failure(Verdict.PERMANENT, "the task names no alias", peer_fault=False)
        row = await self.pool.fetchrow(query("alias_for_cleanup"), peer.id, alias)
        if row is None:
            return None
        schema = await home_call(self.home.schema())
        entity = await self.pool.fetchrow(query("entity_for_delivery"), peer.id, claim.internal_id)
        resource_type = entity["resource_type"] if entity is not None else "User"
        return alias, schema.endpoints.by_type.get(resource_type, f"/{resource_type}s"), entity

    async def move_memberships(self, peer: Peer, claim: Claim) -> None:
        """Groups of the peer holding the alias hold the survivor's primary instead."""
        found = await self._alias_endpoint(peer, claim)
        if found is None:
            return
        alias, _endpoint, entity = found
        primary = (entity["external_id"] if entity is not None else None) or claim.payload.get(
            "target_external_id"
        )
        if not isinstance(primary, str):
            raise Later(self.tools.settings.dependency_wait, "waiting for the survivor's create")
        client = self.tools.clients(peer)
        groups = (await home_call(self.home.schema())).endpoints.by_type.get("Group", "/Groups")
        patched = await self._move_in_peer(client, groups, alias, primary)
        await self._follow_in_copies(peer, claim, alias, primary, patched)

    async def _move_in_peer(
        self, client: PeerClient, groups: str, alias: str, primary: str
    ) -> list[str]:
        """PATCH every group of the peer naming the alias; the groups patched."""
        patched: list[str] = []
        for group_id in await client.find_by(groups, "members.value", alias):
            answer = await client.call(
                "GET", f"{groups}/{group_id}", params={"attributes": "members"}
            )
            if answer.status == 404:
                continue
            if answer.status != 200 or not isinstance(answer.body, dict):
                raise judge(answer.status, answer.body, answer.headers, f"GET {groups}/...")
            ops = membership_move(answer.body.get("members"), alias, primary)
            if ops is None:
                continue  # changed meanwhile (the group's own sync): a remove would match nothing
            answer = await client.call(
                "PATCH", f"{groups}/{group_id}", body={"schemas": [PATCH_SCHEMA], "Operations": ops}
            )
            if answer.status not in DELETED:
                raise judge(answer.status, answer.body, answer.headers, f"PATCH {groups}/...")
            patched.append(group_id)
        return patched

    async def _follow_in_copies(
        self, peer: Peer, claim: Claim, alias: str, primary: str, patched: list[str]
    ) -> None:
        """What the peer last received of the broker's own groups now names the primary."""
        async with self.pool.acquire() as conn, conn.transaction():
            # The survivor and its account are held until this is recorded: a split handing the
            # account over meanwhile waits, then finds the copies naming it; one that handed it
            # over already leaves the groups naming another entity's account: synced again.
            moved = await copy_is_stale(
                conn, peer.id, claim.internal_id, {claim.internal_id: primary}
            )
            followed: list[str] = []
            for copy in await conn.fetch(query("copies_naming"), peer.id, alias):
                document = follow_move(copy["document"], alias, primary)
                await conn.execute(query("save_copy"), peer.id, copy["internal_id"], document, None)
                followed.append(copy["internal_id"])
            if patched:
                # A group of the broker's changed here whose copy named no alias: its own sync
                # recorded what it wrote meanwhile, which did not see this change.
                await conn.execute(query("resync_groups_moved"), peer.id, patched, followed)
            if moved and followed:
                await conn.execute(query("enqueue_sync_to"), peer.id, followed, self.tools.now())

    async def delete_alias(self, peer: Peer, claim: Claim) -> None:
        """DELETE the alias at the peer; on 2xx or 404 its row is retired (or removed)."""
        found = await self._alias_endpoint(peer, claim)
        if found is None:
            return
        alias, endpoint, _entity = found
        answer = await self.tools.clients(peer).call("DELETE", f"{endpoint}/{alias}")
        if answer.status not in DELETED:
            raise judge(answer.status, answer.body, answer.headers, f"DELETE {endpoint}/...")
        async with self.pool.acquire() as conn, conn.transaction():
            await accounts.retire_alias(conn, peer.id, alias, self.tools.settings.retention)
            # A group delivered while the memberships moved may name the alias still.
            await conn.execute(query("resync_groups_naming"), [peer.id], [alias])
            revived = await conn.fetchval(query("account_owner"), peer.id, alias)
            if revived is not None:
                # A split gave the alias back to an entity while its delete was on its way:
                # that entity finds it gone, and is created anew.
                await conn.execute(query("enqueue_sync_to"), peer.id, [revived], self.tools.now())

    async def undo_create(self, peer: Peer, claim: Claim) -> None:
        """A merge or split cancelled a create: whatever an earlier attempt made goes again."""
        handle = claim.payload.get("correlation_handle")
        schema = await home_call(self.home.schema())
        entity = await self.pool.fetchrow(query("entity_for_delivery"), peer.id, claim.internal_id)
        resource_type = entity["resource_type"] if entity is not None else "User"
        endpoint = schema.endpoints.by_type.get(resource_type)
        if not isinstance(handle, str) or endpoint is None:
            return
        client = self.tools.clients(peer)
        for made in await client.find_by(endpoint, "externalId", handle):
            if await self.pool.fetchval(query("mapped_account"), peer.id, made):
                continue  # it became some entity's account after all
            answer = await client.call("DELETE", f"{endpoint}/{made}")
            if answer.status not in DELETED:
                raise judge(answer.status, answer.body, answer.headers, f"DELETE {endpoint}/...")

    async def delete_orphan(self, peer: Peer, claim: Claim) -> None:
        """An orphan account a reconciliation deprovisions (``--on-unmatched deprovision``):
        DELETEd unless it became some entity's account meanwhile (a link, a create's answer)."""
        account = claim.payload.get("external_id")
        if not isinstance(account, str):
            raise Failure(Verdict.PERMANENT, "the task names no account", peer_fault=False)
        if await self.pool.fetchval(query("mapped_account"), peer.id, account):
            return
        schema = await home_call(self.home.schema())
        resource_type = str(claim.payload.get("resource_type") or "User")
        endpoint = schema.endpoints.by_type.get(resource_type, f"/{resource_type}s")
        answer = await self.tools.clients(peer).call("DELETE", f"{endpoint}/{account}")
        if answer.status not in DELETED:
            raise judge(answer.status, answer.body, answer.headers, f"DELETE {endpoint}/...")
