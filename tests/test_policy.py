"""A domain's policy as pure decisions (broker/scim/policy.py): no I/O, attacker inputs."""

from __future__ import annotations

from typing import Any

import pytest

from broker.errors import ForbiddenError, InvalidValueError
from broker.scim.attributes import AttrRef, SchemaIndex
from broker.scim.canonical import canonical_resource
from broker.scim.filters import FilterError, parse_filter
from broker.scim.policy import (
    DomainPolicy,
    check_create_scope,
    check_filter,
    check_sort,
    check_write,
    keep_hidden_in_document,
    keep_hidden_members,
    matches,
    members_by_value,
    put_as_patch,
)

INDEX = SchemaIndex.default()
USER = INDEX.by_type["User"]
GROUP = INDEX.by_type["Group"]
CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
S = DomainPolicy(
    "S",
    scope='title eq "team"',
    read=("userName", "title", "displayName", "members", f"{ENTERPRISE}:manager"),
    write=("displayName", "nickName"),
)


@pytest.mark.parametrize(
    "text",
    [
        'emails.value sw "alice@"',
        'emails[value sw "a"]',
        'EMAILS.VALUE sw "a"',
        f'{CORE_USER}:emails.value sw "a"',
        'userName eq "x" and not (emails pr)',
        f'{ENTERPRISE}:employeeNumber eq "1"',
        "meta.location pr",
    ],
)
def test_a_filter_on_what_the_domain_cannot_read_is_400_invalid_filter(text: str) -> None:
    with pytest.raises(FilterError) as info:
        check_filter(S, [USER], parse_filter(text))
    assert info.value.status == 400
    assert info.value.scim_type == "invalidFilter"


def test_a_filter_on_what_the_domain_reads_passes() -> None:
    check_filter(S, [USER], parse_filter(f'userName sw "a" and {ENTERPRISE}:manager.value eq "x"'))
    check_filter(
        S, [USER], parse_filter('id eq "x" or externalId eq "y" or meta.created gt "2020"')
    )


@pytest.mark.parametrize(
    "text",
    [
        'meta.version gt "W/\\"3\\""',
        'META.VERSION eq "x"',
        f"{CORE_USER}:meta.version pr",
        'meta[version lt "x"]',
        "meta.location pr",
    ],
)
def test_no_domain_may_compare_home_s_versions_or_locations(text: str) -> None:
    with pytest.raises(FilterError):
        check_filter(DomainPolicy("D"), [USER], parse_filter(text))


@pytest.mark.parametrize(
    "text",
    [
        'meta.lastModified gt "2026-01-01T00:00:00Z"',
        'META.CREATED lt "2026"',
        f"{CORE_USER}:meta.created pr",
        'meta[lastModified gt "2024-01-01T00:00:00Z"]',
    ],
)
def test_an_unlinkable_domain_cannot_bisect_its_coarsened_timestamps(text: str) -> None:
    with pytest.raises(FilterError):
        check_filter(DomainPolicy("U", unlinkable=True), [USER], parse_filter(text))
    if "[" not in text:
        check_filter(DomainPolicy("D"), [USER], parse_filter(text))


def test_an_unlinkable_domain_cannot_filter_or_sort_on_timestamps() -> None:
    hidden = DomainPolicy("U", unlinkable=True)
    with pytest.raises(FilterError):
        check_filter(hidden, [USER], parse_filter('meta.lastModified gt "2026-01-01T00:00:00Z"'))
    with pytest.raises(InvalidValueError):
        check_sort(hidden, [USER], "meta.created")
    check_sort(DomainPolicy("D"), [USER], "meta.created")


@pytest.mark.parametrize("sort_by", ["emails.value", "EMAILS", f"{CORE_USER}:emails", "id", "x["])
def test_sorting_by_what_the_domain_cannot_read_is_400(sort_by: str) -> None:
    with pytest.raises(InvalidValueError) as info:
        check_sort(S, [USER], sort_by)
    assert info.value.status == 400


def test_an_unknown_attribute_in_a_filter_is_refused() -> None:
    with pytest.raises(FilterError):
        check_filter(DomainPolicy("D"), [USER], parse_filter("isAdmin eq true"))


@pytest.mark.parametrize(
    "doc",
    [
        {"userName": "x"},
        {"TITLE": "x"},
        {f"{CORE_USER}:active": False},
        {"emails": [{"value": "a@b"}]},
        {ENTERPRISE: {"manager": {"value": "m"}}},
    ],
)
def test_writing_outside_the_write_list_is_400_mutability(doc: dict[str, Any]) -> None:
    canonical = canonical_resource(doc, USER)
    with pytest.raises(InvalidValueError) as info:
        check_write(S, USER, canonical.written)
    assert info.value.scim_type == "mutability"


def test_writing_inside_the_write_list_passes_whatever_the_spelling() -> None:
    canonical = canonical_resource(
        {"DISPLAYNAME": "d", f"{CORE_USER}:nickname": "n", "externalId": "e"}, USER
    )
    check_write(S, USER, canonical.written)


def test_the_read_list_applies_to_extension_attributes_one_by_one() -> None:
    doc = {
        "schemas": [CORE_USER, ENTERPRISE],
        "id": "i",
        "userName": "u",
        "emails": [{"value": "a@b"}],
        ENTERPRISE: {"manager": {"value": "m"}, "employeeNumber": "7"},
    }
    assert S.readable(doc, USER) == {
        "schemas": [CORE_USER, ENTERPRISE],
        "id": "i",
        "userName": "u",
        ENTERPRISE: {"manager": {"value": "m"}},
    }
    only_core = DomainPolicy("C", read=("userName",))
    assert only_core.readable(doc, USER) == {"schemas": [CORE_USER], "id": "i", "userName": "u"}


def test_a_create_outside_the_scope_is_forbidden() -> None:
    scope = parse_filter('title eq "team" and emails[type eq "work" and value ew "@acme.org"]')
    inside = {"title": "TEAM", "emails": [{"type": "work", "value": "a@acme.org"}]}
    check_create_scope(S, scope, inside, USER)
    for outside in ({"title": "other"}, {"title": "team"}, {"title": "team", "emails": []}):
        with pytest.raises(ForbiddenError):
            check_create_scope(S, scope, outside, USER)


@pytest.mark.parametrize(
    ("text", "doc", "expected"),
    [
        ('title eq "a"', {"title": "A"}, True),
        ('title ne "a"', {"title": "b"}, True),
        ('title ne "a"', {}, True),
        ("title pr", {"title": ""}, False),
        ('userName sw "b" or title co "x"', {"userName": "Bob"}, True),
        ('not (title eq "a")', {"title": "a"}, False),
        (f'{ENTERPRISE}:department eq "d"', {ENTERPRISE: {"department": "D"}}, True),
        (
            'emails.value ew "@x.org"',
            {"emails": [{"value": "a@y.org"}, {"value": "b@x.org"}]},
            True,
        ),
        ('title gt "m"', {"title": 5}, False),
    ],
)
def test_the_scope_evaluator_follows_rfc_7644(
    text: str, doc: dict[str, Any], expected: bool
) -> None:
    assert matches(parse_filter(text), doc, USER) is expected


def test_members_are_selected_by_value_only_under_a_scope() -> None:
    assert members_by_value(parse_filter('value eq "a" or value eq "b"'))
    assert not members_by_value(parse_filter('display sw "a"'))
    assert not members_by_value(parse_filter('value ne "a"'))
    assert not members_by_value(parse_filter('value eq "a" and display pr'))


def test_a_scoped_group_write_keeps_the_members_the_domain_cannot_see() -> None:
    current, hidden = ["v1", "h1", "v2", "h2"], {"h1", "h2"}
    ops = [
        {"op": "replace", "path": "members", "value": [{"value": "n1"}]},
        {"op": "remove", "path": "members"},
        {"op": "remove", "path": "members", "value": [{"value": "v1"}]},
        {"op": "replace", "value": {"members": [{"value": "n2"}], "displayName": "g"}},
        {"op": "add", "path": "members", "value": [{"value": "n3"}]},
        {"op": "remove", "path": 'members[value eq "v2"]'},
    ]
    out = keep_hidden_members(ops, current, hidden)
    assert out[0]["value"] == [{"value": "n1"}, {"value": "h1"}, {"value": "h2"}]
    assert out[1] == {"op": "remove", "path": 'members[value eq "v1" or value eq "v2"]'}
    assert out[2] == {"op": "remove", "path": 'members[value eq "v1"]'}
    assert out[3]["value"]["members"] == [{"value": "n2"}, {"value": "h1"}, {"value": "h2"}]
    assert out[4:] == ops[4:]
    assert keep_hidden_members([{"op": "remove", "path": "members"}], ["h1"], {"h1"}) == []
    put = keep_hidden_in_document({"displayName": "g"}, current, hidden)
    assert put["members"] == [{"value": "h1"}, {"value": "h2"}]


def test_a_put_by_a_domain_with_a_write_list_changes_only_what_it_may_write() -> None:
    canonical = canonical_resource({"userName": "ignored", "displayName": "D"}, USER)
    current = {"userName": "u", "nickName": "n", "title": "t", "displayName": "old"}
    policy = DomainPolicy("W", write=("displayName", "nickName"))
    patch = put_as_patch(canonical, policy, USER, current)
    assert [(o.op, str(o.path)) for o in patch.operations] == [
        ("replace", "displayName"),
        ("remove", "nickName"),
    ]
    assert AttrRef(None, "userName") in canonical.written  # refused earlier by check_write
