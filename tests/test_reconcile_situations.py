"""Reconciliation's pure decisions: each situation from one page and its lookups, drift, the
correlation rule, and the deletion threshold (docs/reconciliation.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.reconcile.situations import (
    Candidate,
    Mapped,
    Options,
    Page,
    classify_page,
    correlation_values,
    deletion_limit,
    deletion_problem,
    differences,
    parse_correlate,
)


def page(
    accounts: Sequence[Mapping[str, Any]],
    *,
    mapped: Mapping[str, Mapped] | None = None,
    desired: Mapping[str, Mapping[str, Any] | None] | None = None,
    in_scope: set[str] | None = None,
    matches: Mapping[tuple[str, str], Sequence[str]] | None = None,
    candidates: Mapping[str, Candidate] | None = None,
    correlate: Sequence[str] = ("userName",),
) -> Page:
    return Page(
        "User",
        accounts,
        correlate,
        mapped or {},
        desired or {},
        frozenset(in_scope or set()),
        matches or {},
        candidates or {},
    )


def situations(p: Page) -> dict[str | None, str]:
    return {i.external_id: i.situation for i in classify_page(p)}


def test_a_mapped_account_that_agrees_with_home_is_linked_and_one_that_differs_drifted() -> None:
    accounts = [
        {"id": "a", "userName": "Alice", "displayName": "Alice A"},
        {"id": "b", "userName": "bob", "displayName": "Robert (old)"},
    ]
    p = page(
        accounts,
        mapped={"a": Mapped("i1", True, "active"), "b": Mapped("i2", True, "active")},
        desired={
            "i1": {"userName": "Alice", "displayName": "Alice A", "externalId": "h1"},
            "i2": {"userName": "bob", "displayName": "Bob"},
        },
        in_scope={"i1", "i2"},
    )
    items = {i.external_id: i for i in classify_page(p)}
    assert items["a"].situation == "linked"
    assert items["b"].situation == "drifted"
    assert items["b"].detail["attributes"] == ["displayName"]


def test_a_mapped_account_whose_entity_home_no_longer_has_is_deleted() -> None:
    p = page(
        [{"id": "a", "userName": "gone"}, {"id": "b", "userName": "merged-away"}],
        mapped={"a": Mapped("i1", True, "active"), "b": Mapped("i2", True, "deleted")},
        desired={"i1": None, "i2": {"userName": "merged-away"}},
        in_scope={"i1", "i2"},
    )
    assert situations(p) == {"a": "deleted", "b": "deleted"}


def test_a_mapped_account_outside_the_scope_is_out_of_scope() -> None:
    p = page(
        [{"id": "a", "userName": "x"}],
        mapped={"a": Mapped("i1", True, "active")},
        desired={"i1": {"userName": "x"}},
        in_scope=set(),
    )
    assert situations(p) == {"a": "out_of_scope"}


def test_an_unmapped_account_is_unlinked_unmatched_disputed_or_out_of_scope() -> None:
    accounts = [
        {"id": "u", "userName": "CAROL"},  # one candidate, case-insensitively
        {"id": "o", "userName": "orphan"},  # none
        {"id": "d", "userName": "dave", "emails": [{"value": "eve@x"}]},  # two candidates
        {"id": "s", "userName": "scoped-out"},
    ]
    p = page(
        accounts,
        correlate=("userName", "emails.value"),
        matches={
            ("username", "carol"): ["c"],
            ("username", "dave"): ["d1"],
            ("emails.value", "eve@x"): ["e1"],
            ("username", "scoped-out"): ["s1"],
        },
        candidates={
            "c": Candidate("c", True),
            "d1": Candidate("d1", True),
            "e1": Candidate("e1", True),
            "s1": Candidate("s1", False),
        },
        desired={"c": {"userName": "carol"}},
    )
    items = {i.external_id: i for i in classify_page(p)}
    assert {k: v.situation for k, v in items.items()} == {
        "u": "unlinked",
        "o": "unmatched",
        "d": "disputed",
        "s": "out_of_scope",
    }
    assert items["u"].internal_id == "c"
    # userName compares case-insensitively (RFC 7643 section 4.1.1): CAROL is carol, no drift.
    assert items["u"].detail == {}


def test_two_accounts_matching_one_entity_or_an_entity_with_an_account_are_disputed() -> None:
    p = page(
        [
            {"id": "x1", "userName": "pat"},
            {"id": "x2", "userName": "PAT"},
            {"id": "y", "userName": "q"},
        ],
        matches={("username", "pat"): ["p"], ("username", "q"): ["q1"]},
        candidates={"p": Candidate("p", True), "q1": Candidate("q1", True, account="acct-9")},
    )
    assert situations(p) == {"x1": "disputed", "x2": "disputed", "y": "disputed"}


def test_an_alias_awaiting_its_delete_is_not_reported_as_an_orphan() -> None:
    p = page([{"id": "a", "userName": "x"}], mapped={"a": Mapped("i1", False, "active")})
    assert situations(p) == {"a": "linked"}


def test_drift_ignores_what_the_peer_adds_and_the_order_of_multi_valued_attributes() -> None:
    desired = {
        "userName": "a",
        "emails": [{"value": "a@x", "type": "work"}, {"value": "b@x", "type": "home"}],
        "name": {"givenName": "A"},
        "members": [],
        "externalId": "handle",
    }
    held = {
        "id": "p1",
        "userName": "a",
        "emails": [
            {"value": "b@x", "type": "home"},
            {"value": "a@x", "type": "work", "primary": False},
        ],
        "name": {"givenName": "A", "familyName": "peer's own"},
        "externalId": "something else",
        "meta": {"resourceType": "User"},
    }
    assert differences(desired, held) == []
    assert differences({**desired, "emails": [{"value": "c@x", "type": "work"}]}, held) == [
        "emails"
    ]
    assert (
        differences({"members": [{"value": "m1"}]}, {"members": [{"value": "m1", "$ref": "x"}]})
        == []
    )
    assert differences({"members": [{"value": "m1"}]}, {"members": []}) == ["members"]


def test_correlation_values_are_lower_cased_and_read_sub_attributes() -> None:
    doc = {"UserName": " Bob ", "emails": [{"Value": "B@X.org"}, {"value": ""}, "junk"]}
    assert correlation_values(doc, ["userName", "emails.value"]) == {
        ("username", "bob"),
        ("emails.value", "b@x.org"),
    }


def test_a_correlation_rule_names_known_attributes() -> None:
    assert parse_correlate("userName, emails.value") == ("userName", "emails.value")
    with pytest.raises(ValueError, match="--correlate password"):
        parse_correlate("password")
    with pytest.raises(ValueError, match="at least one"):
        parse_correlate(" , ")


def test_only_and_the_actions_decide_what_a_run_does() -> None:
    options = Options(only=frozenset({"unlinked"}))
    assert options.action("unlinked") == "link"
    assert options.action("missing") == "report"  # not covered by --only
    assert Options().action("unmatched") == "report"  # nothing deleted unless asked
    assert Options().action("deleted") == "report"
    assert Options.from_json(Options(dry_run=True).to_json()) == Options(dry_run=True)


def test_the_deletion_threshold_is_five_percent_or_500_whichever_is_smaller() -> None:
    assert deletion_limit(20, None) == 1
    assert deletion_limit(3, None) == 1  # never below one: a small federation's one deletion
    assert deletion_limit(100_000, None) == 500
    assert deletion_limit(20, 7) == 7
    problem = deletion_problem(2, 20, limit=1, confirmed=0, command="broker reconcile P")
    assert problem is not None and "--confirm-deletions 2" in problem and "10%" in problem
    assert deletion_problem(2, 20, limit=1, confirmed=2, command="c") is None
    assert deletion_problem(3, 20, limit=1, confirmed=2, command="c") is not None
    assert deletion_problem(1, 20, limit=1, confirmed=0, command="c") is None
    assert deletion_problem(2, 0, limit=1, confirmed=0, command="c") is not None


names = st.text(alphabet="abcXYZ", min_size=1, max_size=3)


@given(
    accounts=st.lists(names, min_size=0, max_size=12),
    home=st.lists(names, min_size=0, max_size=12),
)
def test_every_account_gets_one_situation_and_no_entity_is_linked_to_two(
    accounts: list[str], home: list[str]
) -> None:
    """Whatever the names, each account is classified once, and at most one account on a page
    is ``unlinked`` to an entity (so a link never gives an entity two accounts)."""
    docs = [{"id": f"p{n}", "userName": name} for n, name in enumerate(accounts)]
    matches: dict[tuple[str, str], list[str]] = {}
    for n, name in enumerate(home):
        matches.setdefault(("username", name.lower()), []).append(f"h{n}")
    candidates = {f"h{n}": Candidate(f"h{n}", True) for n in range(len(home))}
    items = classify_page(page(docs, matches=matches, candidates=candidates))
    assert [i.external_id for i in items] == [d["id"] for d in docs]
    linked = [i.internal_id for i in items if i.situation == "unlinked"]
    assert len(linked) == len(set(linked))
    for item, name in zip(items, accounts, strict=True):
        found = matches.get(("username", name.lower()), [])
        expected = {0: {"unmatched"}, 1: {"unlinked", "disputed"}}.get(len(found), {"disputed"})
        assert item.situation in expected
