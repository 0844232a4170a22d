"""The leak guard's exact lookup and LeakGuard on a real PostgreSQL: it blocks what really is an
internal ID, however written, and nothing a domain or the broker wrote that merely looks like
one."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from broker.config import DEFAULT_ID_PATTERN
from broker.mapping.cache import KnownInternalIds, MappingCache
from broker.mapping.guard import LeakGuard
from broker.mapping.store import MappingStore
from broker.scim.guard import IN_PLAY, KNOWN, IdShape
from tests.conftest import QueryCounter

HEX = IdShape(r"[0-9a-f]{32}")
DEFAULT = IdShape(DEFAULT_ID_PATTERN)


def _dashed(h: str) -> str:
    return str(uuid.UUID(h))


async def test_the_exact_lookup_is_one_query_for_many_candidates_and_keeps_positives(
    counted_pool: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    pool, counter = counted_pool
    store = MappingStore(pool)
    internal = [uuid.uuid4().hex for _ in range(3)]
    await store.register_entities(dict.fromkeys(internal, "User"))
    candidates = {*internal, *(uuid.uuid4().hex for _ in range(200))}
    before = len(await counter.sent())
    assert await store.internal_ids_among(candidates) == set(internal)
    assert len(await counter.sent()) == before + 1, (await counter.sent())[before:]
    # Positives stand for good: asked again, they cost nothing.
    assert await store.internal_ids_among(internal) == set(internal)
    assert len(await counter.sent()) == before + 1
    # Negatives are asked again (only they: one query).
    assert await store.internal_ids_among(candidates) == set(internal)
    assert len(await counter.sent()) == before + 2


async def test_a_negative_answer_is_not_kept_once_the_entity_is_recorded(
    pool: asyncpg.Pool,
) -> None:
    store = MappingStore(pool, cache=MappingCache())
    later = uuid.uuid4().hex
    assert await store.internal_ids_among([later]) == set()
    # Another process (another store) records the entity meanwhile.
    await MappingStore(pool).register_entities({later: "User"})
    assert await store.internal_ids_among([later]) == {later}


async def test_an_entity_recorded_by_translation_is_found_at_once(pool: asyncpg.Pool) -> None:
    store = MappingStore(pool)
    await pool.execute("INSERT INTO domains (id, kind) VALUES ('D', 'peer')")
    fresh = uuid.uuid4().hex
    assert await store.internal_ids_among([fresh]) == set()
    await store.resolve_outbound("D", {fresh: "User"}, mint=True)
    assert await store.internal_ids_among([fresh]) == {fresh}


def test_the_positive_cache_is_bounded_and_forgets_the_oldest() -> None:
    known = KnownInternalIds(max_entries=2)
    known.add(["a", "b"])
    known.add(["c"])
    assert len(known) == 2 and known.among(["a", "b", "c"]) == {"b", "c"}
    off = KnownInternalIds(max_entries=0)
    off.add(["a"])
    assert off.among(["a"]) == set()


def test_clearing_the_mapping_cache_keeps_the_positives() -> None:
    cache = MappingCache()
    cache.internal_ids.add(["a"])
    cache.clear()
    cache.invalidate(["a"])
    assert cache.internal_ids.among(["a"]) == {"a"}


@pytest.mark.parametrize(
    "written",
    [
        "emp-{id}",
        "x_{id}",
        "abc{id}def",
        "{ID}",
        "{dashed}",
        "emp-{DASHED}_x",
        "ff{id}00",
        "\\u00{first}{rest}",
    ],
)
@pytest.mark.parametrize("shape", [HEX, DEFAULT], ids=["32-hex", "default"])
async def test_an_actual_internal_id_written_into_free_text_is_caught(
    pool: asyncpg.Pool, written: str, shape: IdShape
) -> None:
    """Only home (or its tools) could write a real internal ID; wherever it stands, however
    written, nobody receives it."""
    store = MappingStore(pool)
    internal = uuid.uuid4().hex
    await store.register_entities({internal: "User"})
    guard = LeakGuard(store, shape)
    text = written.format(
        id=internal,
        ID=internal.upper(),
        dashed=_dashed(internal),
        DASHED=_dashed(internal).upper(),
        first=f"{ord(internal[0]):02x}",
        rest=internal[1:],
    )
    body = json.dumps({"id": "minted-1", "title": "?"}).replace("?", text)
    leak = await guard.check([("body", body)], in_play=set())
    assert leak is not None and leak.where == "body" and leak.reason == KNOWN
    assert internal not in leak.reason


async def test_an_internal_id_home_wrote_in_upper_case_is_found_in_lower_case(
    pool: asyncpg.Pool,
) -> None:
    store = MappingStore(pool)
    internal = uuid.uuid4().hex.upper()
    await store.register_entities({_dashed(internal).upper(): "User"})
    leak = await LeakGuard(store, DEFAULT).check([("body", internal.lower())], in_play=())
    assert leak is not None


async def test_what_merely_looks_like_an_id_blocks_nothing(
    counted_pool: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    """A domain's random hex in a text attribute, and the broker's own jti, txn and correlation
    IDs, are not internal IDs, whatever id_pattern says (the README's default UUID shape here)."""
    pool, counter = counted_pool
    store = MappingStore(pool)
    await store.register_entities({uuid.uuid4().hex: "User"})
    guard = LeakGuard(store, DEFAULT)
    claims = {
        "jti": uuid.uuid4().hex,
        "txn": str(uuid.uuid4()),
        "events": {"x": {"title": f"emp-{uuid.uuid4().hex.upper()}", "ref": uuid.uuid4().hex}},
    }
    before = len(await counter.sent())
    assert await guard.check([("SET", json.dumps(claims))], in_play={uuid.uuid4().hex}) is None
    assert len(await counter.sent()) == before + 1, "one lookup, for every candidate at once"
    # Nothing in the ID shape at all: no lookup.
    assert await guard.check([("body", '{"id": "AbC_12"}')], in_play={"42x"}) is None
    assert len(await counter.sent()) == before + 1


async def test_an_internal_id_in_play_is_caught_without_a_lookup(
    counted_pool: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    pool, counter = counted_pool
    guard = LeakGuard(MappingStore(pool), HEX)
    unrecorded = uuid.uuid4().hex
    before = len(await counter.sent())
    leak = await guard.check(
        [("body", "{}"), ("header Location", f"/Users/x_{unrecorded.upper()}")],
        in_play={unrecorded},
    )
    assert leak is not None and leak.where == "header Location" and leak.reason == IN_PLAY
    assert len(await counter.sent()) == before


async def test_the_request_is_never_trusted(pool: asyncpg.Pool) -> None:
    """The first guard let through any ID-shaped string the request held; an echo of a
    recovered internal ID is caught now (there is no way to pass the request in)."""
    store = MappingStore(pool)
    internal = uuid.uuid4().hex
    await store.register_entities({internal: "User"})
    request_text = json.dumps({"filter": f'title eq "{internal}"'})
    response = json.dumps({"Resources": [{"title": internal}]})
    assert request_text  # what the domain sent plays no part
    assert await LeakGuard(store, HEX).check([("body", response)], in_play=()) is not None


async def test_leaks_names_each_leaking_part_of_a_batch_in_one_lookup(
    counted_pool: tuple[asyncpg.Pool, QueryCounter],
) -> None:
    pool, counter = counted_pool
    store = MappingStore(pool)
    internal, in_play = uuid.uuid4().hex, uuid.uuid4().hex
    await store.register_entities({internal: "User"})
    parts = [
        ("1", json.dumps({"title": uuid.uuid4().hex})),
        ("2", json.dumps({"title": f"see {internal.upper()}"})),
        ("3", json.dumps({"jti": str(uuid.uuid4())})),
        ("4", json.dumps({"note": in_play})),
    ]
    before = len(await counter.sent())
    found = await LeakGuard(store, DEFAULT).leaks(parts, in_play={in_play})
    assert [(leak.where, leak.reason) for leak in found] == [("2", KNOWN), ("4", IN_PLAY)]
    assert len(await counter.sent()) == before + 1


async def test_a_failed_lookup_fails_closed(db_url: str) -> None:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    guard = LeakGuard(MappingStore(pool), HEX)
    await pool.close()
    with pytest.raises(asyncpg.InterfaceError):
        await guard.check([("body", uuid.uuid4().hex)], in_play=())
