"""Hypothesis: the page path with the cache's answers (``translate_known``, issue 15) is the page
path without them.

For generated home documents (the strategies of ``test_outbound_fast``: odd key spellings,
extensions, missing and non-string values, foreign URIs, an ``externalId`` however spelled) and
any answers, the documents ``translate_known`` rewrites, followed by the general way for the rest
(as ``Proxy.outbound`` runs it), serialise to the same bytes as ``translate_page`` then
``render`` then ``present_meta`` for the whole page, and list the same IDs with the same types. For a domain with a scope, what the walk takes names
no user that ``Proxy.in_scope`` would ask home about.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.scim.knownpage import translate_known
from broker.scim.outbound import DomainView, translate_page
from broker.scim.rewrite import Endpoints, Translation
from broker.scim.schemas import DEFAULT_REFERENCES, ReferenceMap
from broker.scim.versions import VersionSealer, present_meta
from tests.test_outbound_fast import (
    ENDPOINTS,
    HOME,
    ODD_ENDPOINTS,
    REFS,
    answers,
    document,
    ids,
    spellings,
    words,
)

BROKER = "https://broker.example/scim/v2"
SEALER = VersionSealer(bytes(64))


class Audience:
    id = "D1"
    unlinkable = False
    timestamp_precision = 1


def seal(version: str, internal_id: str) -> str:
    return SEALER.seal(version, domain=Audience.id, internal_id=internal_id)


def general(
    docs: list[dict[str, Any]],
    views: dict[str, DomainView],
    translation: Translation,
    resource_type: str | None,
) -> tuple[dict[str, str | None], bytes]:
    """The page path without the cache: plan, the store's answers, render, present_meta."""
    owned = orjson.loads(orjson.dumps(docs))
    page = translate_page(owned, translation, resource_type=resource_type)
    internal_ids = [str(d.get("id")) for d in owned]
    out = page.render({i: views[i] for i in page.wanted if i in views}, in_place=True)
    shown = [
        None
        if o is None
        else present_meta(o, domain=Audience(), internal_id=i, sealer=SEALER, in_place=True)
        for o, i in zip(out, internal_ids, strict=True)
    ]
    return page.wanted, orjson.dumps(shown)


def with_cache(
    docs: list[dict[str, Any]],
    views: dict[str, DomainView],
    cached: set[str],
    translation: Translation,
    resource_type: str | None,
    scope_own: frozenset[str] | None = None,
) -> tuple[dict[str, str | None], bytes, int]:
    """As ``Proxy.outbound`` runs it: the known run first, the general way for the rest."""
    owned = orjson.loads(orjson.dumps(docs))
    known = translate_known(
        owned,
        translation,
        lambda i: views[i] if i in cached and i in views else None,
        resource_type=resource_type,
        seal=seal,
        scope_own=scope_own,
    )
    if scope_own is not None:
        # What the walk took names no user Proxy.in_scope would have asked home about.
        taken = translate_page(docs[: known.count], translation, resource_type=resource_type)
        assert not [
            i for i, t in taken.wanted.items() if t in (None, "User") and i not in scope_own
        ]
    rest = owned[known.count :]
    page = translate_page(rest, translation, resource_type=resource_type)
    wanted = dict(known.wanted)
    for internal, rtype in page.wanted.items():
        if wanted.get(internal) is None:
            wanted[internal] = rtype
    internal_ids = [str(d.get("id")) for d in rest]
    out = page.render({i: views[i] for i in page.wanted if i in views}, in_place=True)
    shown = [
        None
        if o is None
        else present_meta(o, domain=Audience(), internal_id=i, sealer=SEALER, in_place=True)
        for o, i in zip(out, internal_ids, strict=True)
    ]
    return wanted, orjson.dumps([*owned[: known.count], *shown]), known.count


@st.composite
def versioned(draw: st.DrawFn) -> dict[str, Any]:
    """A document, with a version in its meta as often as not (however spelled)."""
    doc = draw(document())
    meta = doc.get("meta")
    if isinstance(meta, dict) and draw(st.booleans()):
        key = draw(st.sampled_from(["version", "version", "Version"]))
        meta[key] = draw(st.sampled_from(['W/"1"', ' "2" ', "", 7, None]))
    return doc


@st.composite
def plain(draw: st.DrawFn) -> dict[str, Any]:
    """A document in the shapes the known walk takes (as home commonly writes them): the odd
    ones come from ``document``."""
    rid = draw(ids)
    doc: dict[str, Any] = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "id": rid}
    if draw(st.booleans()):
        doc[draw(spellings("externalId"))] = draw(words)
    values = []
    for _ in range(draw(st.integers(0, 4))):
        value = draw(ids)
        item: dict[str, Any] = {"value": value}
        kind = draw(st.integers(0, 3))
        if kind <= 2:
            endpoint = draw(st.sampled_from(["Users", "Groups"]))
            named = draw(st.sampled_from([value, value, draw(ids)]))  # a $ref may differ
            item["$ref"] = f"{HOME}/{endpoint}/{named}"
        if kind >= 2:
            item["type"] = draw(st.sampled_from(["User", "Group"]))
        item["display"] = draw(words)
        values.append(item)
    doc[draw(st.sampled_from(["groups", "members", "members"]))] = values
    home_type = draw(st.sampled_from(["User", "Group"]))
    doc["meta"] = {
        "resourceType": home_type,
        "location": f"{HOME}/{home_type}s/{draw(st.sampled_from([rid, rid, draw(ids)]))}",
        "version": 'W/"1"',
    }
    return doc


every_answer = st.builds(
    lambda hr: {f"{n:032x}": DomainView(f"ext-{n}", hr if n % 2 else None) for n in range(1, 9)},
    st.sampled_from([None, "hr"]),
)


_TRANSLATIONS: dict[tuple[int, int, str], Translation] = {}


def shared_translation(refs: ReferenceMap, endpoints: Endpoints, base: str) -> Translation:
    """One Translation per combination, kept from example to example as the proxy keeps one per
    home schema load: what a walk memoises for its translation (the planner's memos, what each
    $ref tells) meets other documents and other answers in the examples after it."""
    key = (id(refs), id(endpoints), base)
    if key not in _TRANSLATIONS:
        _TRANSLATIONS[key] = Translation(refs, endpoints, base, BROKER)
    return _TRANSLATIONS[key]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    docs=st.lists(st.one_of(plain(), plain(), versioned()), max_size=5),
    views=st.one_of(answers(), every_answer),
    cached=st.one_of(st.sets(ids), st.just({f"{n:032x}" for n in range(1, 9)})),
    scope_own=st.one_of(st.none(), st.frozensets(ids)),
    refs=st.sampled_from([REFS, DEFAULT_REFERENCES]),
    endpoints=st.sampled_from([ENDPOINTS, ODD_ENDPOINTS]),
    resource_type=st.sampled_from([None, "User", "Group"]),
    base=st.sampled_from([HOME, HOME + "/", "/v2"]),
)
def test_the_known_run_then_the_general_way_is_the_general_path(
    docs: list[dict[str, Any]],
    views: dict[str, DomainView],
    cached: set[str],
    scope_own: frozenset[str] | None,
    refs: ReferenceMap,
    endpoints: Endpoints,
    resource_type: str | None,
    base: str,
) -> None:
    translation = shared_translation(refs, endpoints, base)
    try:
        wanted, out = general(docs, views, translation, resource_type)
    except Exception as exc:  # the general path fails on some odd documents: so must this one
        failure = type(exc)
        try:
            with_cache(docs, views, cached, translation, resource_type, scope_own)
        except failure:
            return
        raise AssertionError(
            f"the general path raised {failure.__name__}; this one did not"
        ) from exc
    known_wanted, known_out, _ = with_cache(
        docs, views, cached, translation, resource_type, scope_own
    )
    assert known_out == out
    assert known_wanted == wanted


def user(n: int, groups: list[int]) -> dict[str, Any]:
    uid = f"{n:032x}"
    return {
        "id": uid,
        "externalId": f"hr-{n}",
        "userName": f"u{n}",
        "groups": [
            {"value": f"{g:032x}", "$ref": f"{HOME}/Groups/{g:032x}", "display": f"g{g}"}
            for g in groups
        ],
        "meta": {"resourceType": "User", "location": f"{HOME}/Users/{uid}", "version": 'W/"3"'},
    }


def test_a_page_the_cache_knows_is_rewritten_whole_in_one_walk() -> None:
    """The bench's shape: every document taken by the known walk, none by the general way."""
    translation = Translation(DEFAULT_REFERENCES, Endpoints.default(), HOME, BROKER)
    docs = [user(n, [100, 101]) for n in range(1, 4)]
    views = {f"{n:032x}": DomainView(f"ext{n}", "mine" if n == 2 else None) for n in (1, 2, 3)}
    views |= {f"{g:032x}": DomainView(f"grp{g}") for g in (100, 101)}
    wanted, out = general(docs, views, translation, "User")
    known_wanted, known_out, count = with_cache(docs, views, set(views), translation, "User")
    assert count == 3
    assert (known_out, known_wanted) == (out, wanted)
    first = orjson.loads(known_out)[0]
    assert first["groups"][1] == {
        "value": "grp101",
        "$ref": f"{BROKER}/Groups/grp101",
        "display": "g101",
    }
    assert first["meta"]["version"].startswith('W/"') and "3" not in first["meta"]["version"]
    assert "externalId" not in first and orjson.loads(known_out)[1]["externalId"] == "mine"


def test_a_miss_stops_the_walk_before_the_document_that_needs_it() -> None:
    """The third document names a group the cache does not hold: it and the rest go the
    general way, untouched by the known walk."""
    translation = Translation(DEFAULT_REFERENCES, Endpoints.default(), HOME, BROKER)
    docs = [user(1, [100]), user(2, [100]), user(3, [100, 102]), user(4, [100])]
    views = {f"{n:032x}": DomainView(f"ext{n}") for n in (1, 2, 3, 4)}
    views |= {f"{g:032x}": DomainView(f"grp{g}") for g in (100, 102)}
    cached = set(views) - {f"{102:032x}"}
    owned = orjson.loads(orjson.dumps(docs))
    lookup = {i: v for i, v in views.items() if i in cached}.get
    known = translate_known(owned, translation, lookup, resource_type="User")
    assert known.count == 2
    assert owned[2:] == docs[2:]  # as home sent them
    assert with_cache(docs, views, cached, translation, "User")[:2] == general(
        docs, views, translation, "User"
    )
