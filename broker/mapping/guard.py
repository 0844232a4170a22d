"""The leak guard (DESIGN sections 3 and 8.5): the last check on everything the broker sends a
domain or a peer. It blocks what really is an internal ID, and nothing else.

A part (a body, a header, a SET) leaks when it holds

- an internal ID in play (known to be in the message's context: the resources it names), found
  whatever its case, however it is glued to its neighbours, in either rendering of a hex UUID,
  or behind JSON escapes; or
- a string in the home's ID shape that the exact lookup (:meth:`MappingStore.internal_ids_among`)
  finds among the internal IDs the broker has recorded.

Nothing else: random hex a domain wrote into a text attribute, and the broker's own identifiers
(``jti``, ``txn``, minted IDs, correlation handles and IDs), are not internal IDs, whatever
``[home] id_pattern`` says, so what one domain wrote can never deny another domain service. The
guard never trusts what a request contained. Real internal IDs fail closed: a leak withholds the
message, and a lookup that fails raises (the caller answers 5xx or retries) rather than let the
message through.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from broker.scim.guard import IdShape, Leak, Scan, find_in_play, known_in, lookup_keys

__all__ = ["InternalIds", "LeakGuard"]


class InternalIds(Protocol):
    """The exact lookup: :class:`broker.mapping.store.MappingStore` is one."""

    async def internal_ids_among(self, candidates: Collection[str]) -> set[str]: ...


class LeakGuard:
    """The leak guard: the pure scan of :mod:`broker.scim.guard`, and one lookup at most."""

    def __init__(self, store: InternalIds, id_shape: IdShape) -> None:
        self.store = store
        self.id_shape = id_shape

    async def check(
        self, parts: Sequence[tuple[str, str | bytes]], *, in_play: Collection[str]
    ) -> Leak | None:
        """The first leak in ``parts`` ((where, text) pairs: the body, each header; a text is a
        str or the UTF-8 bytes it is sent as), or None.

        ``in_play``: the internal IDs of the message's context (those its translation asked
        about); never anything taken from the request.
        """
        found = await self.leaks(parts, in_play=in_play, first=True)
        return found[0] if found else None

    async def leaks(
        self,
        parts: Sequence[tuple[str, str | bytes]],
        *,
        in_play: Collection[str],
        first: bool = False,
    ) -> list[Leak]:
        """Every part of ``parts`` that leaks (with ``first``, only the first found), in one
        lookup at most however many parts."""
        scans = [Scan.of(where, text, self.id_shape) for where, text in parts]
        found: list[Leak] = []
        for scan in scans:
            leak = find_in_play([scan], in_play, self.id_shape)
            if leak is not None:
                if first:
                    return [leak]
                found.append(leak)
        tokens = {t for scan in scans for t in scan.tokens}
        if tokens:
            known = await self.store.internal_ids_among(lookup_keys(tokens))
            if known:
                flagged = {leak.where for leak in found}
                found += [k for k in known_in(scans, known) if k.where not in flagged]
        if first:
            return found[:1]
        order = {scan.where: n for n, scan in enumerate(scans)}
        return sorted(found, key=lambda leak: order[leak.where])
