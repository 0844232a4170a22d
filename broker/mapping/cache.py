"""An in-process cache of the mapping table's answers, kept true by PostgreSQL notifications.

Every UPDATE or DELETE of a mapping row, and every change of an entity's state, is announced on
channel ``broker_mappings`` with the entity's internal ID (migration 0003). Each broker process
listens and drops every answer that involved that entity. Only rows that exist are cached, never
misses, so an INSERT needs no announcement.

A query that was in flight while a notification arrived must not put its (possibly old) answer
in the cache: answers are stored only if no invalidation happened since the query started
(:attr:`generation`). While the listening connection is down the cache stays off, so every
answer comes from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from broker.db import listening

__all__ = ["CHANNEL", "KnownInternalIds", "MappingCache", "listen"]

CHANNEL = "broker_mappings"


class KnownInternalIds:
    """Strings the exact lookup found to be internal IDs (the leak guard's positive answers).

    An internal ID never stops being one, so an answer stands for good and needs no
    notification: this set is on whether or not the mapping cache listens, and :meth:`clear`
    of the mapping cache leaves it alone. It is bounded; past the bound the oldest answers are
    forgotten (and looked up again when next needed). A negative answer is never kept: the
    broker may record the entity a moment later, in this process or another.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._known: dict[str, None] = {}  # insertion-ordered: the oldest first

    def __len__(self) -> int:
        return len(self._known)

    def among(self, candidates: Iterable[str]) -> set[str]:
        return {c for c in candidates if c in self._known}

    def add(self, internal_ids: Iterable[str]) -> None:
        if self.max_entries <= 0:
            return
        for internal in internal_ids:
            self._known[internal] = None
        excess = len(self._known) - self.max_entries
        if excess > 0:
            for oldest in list(itertools.islice(self._known, excess)):
                del self._known[oldest]


class MappingCache:
    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self.internal_ids = KnownInternalIds(max_entries)
        """The leak guard's positive answers (on whether or not the rest of the cache is)."""
        self.enabled = False
        self.generation = 0
        self.inbound: dict[tuple[str, str], str] = {}
        self.outbound: dict[str, dict[str, object]] = {}
        """By domain: asked internal ID -> the answer; one table per domain, so that a page's
        look-ups build no key and are the table's own ``get`` (issue 15)."""
        # internal ID -> the keys whose answer depends on it
        self._depends: dict[str, set[tuple[str, str, str]]] = {}

    def entries(self) -> int:
        """How many answers are held, both directions."""
        return len(self.inbound) + sum(len(t) for t in self.outbound.values())

    def get_inbound(self, domain: str, external_ids: Iterable[str]) -> dict[str, str]:
        if not self.enabled:
            return {}
        return {e: self.inbound[domain, e] for e in external_ids if (domain, e) in self.inbound}

    def get_outbound(self, domain: str, asked: Iterable[str]) -> dict[str, object]:
        if not self.enabled:
            return {}
        table = self.outbound.get(domain, {})
        return {a: table[a] for a in asked if a in table}

    def outbound_of(self, domain: str) -> Callable[[str], Any] | None:
        """A synchronous look-up of ``domain``'s cached outbound answers (None for an ID not
        cached), for a walk that runs with no await in between (issue 15: the page path); None
        when the cache is off."""
        if not self.enabled:
            return None
        table = self.outbound.get(domain)
        if table is None:
            table = self.outbound[domain] = {}
        return table.get  # no answer is None

    def put_inbound(self, generation: int, domain: str, answers: dict[str, str]) -> None:
        if not self._may_store(generation, len(answers)):
            return
        for external, internal in answers.items():
            self.inbound[domain, external] = internal
            self._depends.setdefault(internal, set()).add(("in", domain, external))

    def put_outbound(
        self, generation: int, domain: str, answers: Iterable[tuple[str, str, object]]
    ) -> None:
        """``answers``: (asked internal ID, the internal ID it resolved to, value)."""
        answers = list(answers)
        if not self._may_store(generation, len(answers)):
            return
        table = self.outbound.get(domain)
        if table is None:
            table = self.outbound[domain] = {}
        for asked, resolved, value in answers:
            table[asked] = value
            for internal in {asked, resolved}:
                self._depends.setdefault(internal, set()).add(("out", domain, asked))

    def _may_store(self, generation: int, count: int) -> bool:
        if not self.enabled or generation != self.generation:
            return False
        if self.entries() + count > self.max_entries:
            self.clear()
        return True

    def invalidate(self, internal_ids: Iterable[str]) -> None:
        """Drop every answer that involved these entities."""
        self.generation += 1
        for internal in internal_ids:
            for direction, domain, key in self._depends.pop(internal, ()):
                if direction == "in":
                    self.inbound.pop((domain, key), None)
                else:
                    self.outbound.get(domain, {}).pop(key, None)

    def clear(self) -> None:
        self.generation += 1
        self.inbound.clear()
        self.outbound.clear()
        self._depends.clear()


@contextlib.asynccontextmanager
async def listen(
    url: str, cache: MappingCache, *, retry_seconds: float = 2.0
) -> AsyncIterator[None]:
    """Keep ``cache`` on while a connection listens on :data:`CHANNEL`; reconnect when it drops."""

    def up() -> None:
        cache.clear()
        cache.enabled = True

    def down() -> None:
        cache.enabled = False
        cache.clear()

    async with listening(
        url,
        CHANNEL,
        lambda payload: cache.invalidate([payload]),
        on_up=up,
        on_down=down,
        retry_seconds=retry_seconds,
    ):
        try:
            for _ in range(50):  # give the first connection a moment, so the cache starts on
                if cache.enabled:
                    break
                await asyncio.sleep(0.02)
            yield
        finally:
            down()
