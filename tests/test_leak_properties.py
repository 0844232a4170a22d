"""Hypothesis: home IDs planted anywhere in home's answers never reach a domain.

Planted in the places IDs belong, the rewriter translates them and the guard has nothing to do.
Planted in free text, where no rewriter can know them, the guard withholds the response (the
exact lookup stands for the broker's entities here: every ID home has, as if each was recorded).
Either way the bytes a domain would receive hold no home ID.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.scim.guard import IdShape, Scan, find_in_play, known_in, lookup_keys
from broker.scim.outbound import DomainView, ids_in_resources, resources_for_domain
from broker.scim.rewrite import Endpoints, Translation
from broker.scim.schemas import DEFAULT_REFERENCES, ENTERPRISE_USER

HOME = "http://home.internal/v2"
BROKER = "https://broker.example/scim/v2"
PATTERN = IdShape(r"[0-9a-f]{32}")
OUTWARD = Translation(DEFAULT_REFERENCES, Endpoints.default(), HOME, BROKER)
home_ids = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
words = st.text(alphabet=st.characters(codec="ascii", categories=["L", "N", "Zs"]), max_size=12)


@st.composite
def user(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "id": draw(home_ids),
        "userName": draw(words),
        "meta": {"resourceType": "User", "location": f"{HOME}/Users/{draw(home_ids)}"},
    }
    doc["meta"]["location"] = f"{HOME}/Users/{doc['id']}"
    if draw(st.booleans()):
        doc["groups"] = [
            {"value": g, "$ref": f"{HOME}/Groups/{g}", "display": draw(words)}
            for g in draw(st.lists(home_ids, max_size=3))
        ]
    if draw(st.booleans()):
        doc[ENTERPRISE_USER] = {"manager": {"value": draw(home_ids)}, "department": draw(words)}
    return doc


@st.composite
def group(draw: st.DrawFn) -> dict[str, Any]:
    gid = draw(home_ids)
    return {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "id": gid,
        "displayName": draw(words),
        "members": [
            {"value": m, "type": draw(st.sampled_from(["User", "Group"])), "display": draw(words)}
            for m in draw(st.lists(home_ids, max_size=4))
        ],
        "meta": {"resourceType": "Group", "location": f"{HOME}/Groups/{gid}"},
    }


def deliver(
    docs: list[dict[str, Any]],
    hidden: set[str] = frozenset(),  # type: ignore[assignment]
    known: set[str] = frozenset(),  # type: ignore[assignment]
) -> tuple[str, bool]:
    """What the proxy would send a domain: the text, and whether the guard let it through
    (``known``: the internal IDs the exact lookup finds)."""
    wanted = ids_in_resources(docs, OUTWARD, resource_type=None)
    views = {i: DomainView(secrets.token_urlsafe(16)) for i in wanted if i not in hidden}
    out = resources_for_domain(docs, views, OUTWARD, resource_type=None)
    text = json.dumps([d for d in out if d is not None])
    scans = [Scan.of("body", text, PATTERN)]
    leak = find_in_play(scans, set(wanted), PATTERN) or known_in(
        scans, lookup_keys(scans[0].tokens) & known
    )
    return text, not leak


def all_home_ids(docs: Any) -> set[str]:
    return set(re.findall(r"[0-9a-f]{32}", json.dumps(docs)))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(user(), group()), min_size=1, max_size=5), st.data())
def test_ids_in_their_places_are_all_translated_and_the_guard_is_never_needed(
    docs: list[dict[str, Any]], data: st.DataObject
) -> None:
    everything = all_home_ids(docs)
    hidden = data.draw(st.sets(st.sampled_from(sorted(everything)))) if everything else set()
    text, passed = deliver(docs, hidden, known=everything)
    assert passed, "the rewriter left an ID for the guard to catch"
    assert not any(i in text for i in everything)


def _plant(doc: Any, path: list[int], planted: str) -> Any:
    """Put ``planted`` into free text somewhere in ``doc`` (chosen by ``path``)."""
    if isinstance(doc, dict):
        keys = sorted(doc)
        if not path or not keys:
            return {**doc, "note": f"ref {planted} here"}
        key = keys[path[0] % len(keys)]
        return {**doc, key: _plant(doc[key], path[1:], planted)}
    if isinstance(doc, list):
        if not path or not doc:
            return [*doc, f"{planted}"]
        i = path[0] % len(doc)
        return [*doc[:i], _plant(doc[i], path[1:], planted), *doc[i + 1 :]]
    if isinstance(doc, str):
        return f"{doc} ({planted})"
    return planted


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.one_of(user(), group()), min_size=1, max_size=4),
    st.lists(st.integers(0, 20), max_size=6),
    st.integers(0, 10),
    home_ids,
)
def test_ids_planted_in_free_text_never_reach_a_domain(
    docs: list[dict[str, Any]], path: list[int], which: int, stranger: str
) -> None:
    # Plant either an ID of this very response or one of a stranger the response never names.
    candidates = [*sorted(all_home_ids(docs)), stranger]
    planted = candidates[which % len(candidates)]
    target = which % len(docs)
    docs = [*docs[:target], _plant(docs[target], path, planted), *docs[target + 1 :]]
    text, passed = deliver(docs, known=all_home_ids(docs))
    if passed:
        assert not any(i in text for i in all_home_ids(docs)), "a home ID got through"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(user(), group()), min_size=1, max_size=3))
def test_collect_lists_exactly_the_ids_the_rewriter_asks_about(docs: list[dict[str, Any]]) -> None:
    from broker.scim.rewrite import collect_ids, rewrite_document

    for doc in docs:
        asked: dict[str, str | None] = {}

        def record(
            resource_id: str, rtype: str | None, asked: dict[str, str | None] = asked
        ) -> str:
            asked.setdefault(resource_id, rtype)
            return resource_id

        rewrite_document(doc, OUTWARD, record)
        collected = collect_ids(doc, OUTWARD)
        assert set(collected) == set(asked)
