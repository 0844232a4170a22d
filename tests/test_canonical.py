"""The canonical request (broker/scim/canonical.py): pure, no I/O. Attacker spellings first."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import InvalidValueError
from broker.scim.attributes import AttrRef, SchemaIndex
from broker.scim.canonical import (
    MAX_DEPTH,
    PATCH_OP,
    canonical_patch,
    canonical_resource,
    check_text,
    parse_body,
    path_segments,
)

INDEX = SchemaIndex.default()
USER = INDEX.by_type["User"]
GROUP = INDEX.by_type["Group"]
CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"


def _error(fn: Any, *args: Any) -> InvalidValueError:
    with pytest.raises(InvalidValueError) as info:
        fn(*args)
    return info.value


@pytest.mark.parametrize(
    "path",
    [
        "/scim/v2/Schemas/..%2F..%2FUsers%3Fcount%3D0",
        "/scim/v2/ResourceTypes/..%2fUsers",
        "/scim/v2/Users/a%2Fb",
        "/scim/v2/Users/a%23b",
        "/scim/v2/Users/a%5Cb",
        "/scim/v2/Users/a%00",
        "/scim/v2/Users/%2e%2e",
        "/scim/v2/Users/..",
        "/scim/v2/Users/./x",
        "/scim/v2/Users/a%0Ab",
    ],
)
def test_a_path_that_smuggles_a_path_or_a_query_is_refused(path: str) -> None:
    assert _error(path_segments, path).scim_type == "invalidPath"


def test_a_plain_path_gives_its_decoded_segments() -> None:
    assert path_segments("/scim/v2/Users/a%20b%40c") == ["scim", "v2", "Users", "a b@c"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"userName": "\xff"}',  # not UTF-8
        '{"userName": "a"}'.encode("utf-16"),  # UTF-16 with its BOM
        b'{"userName": "a", "userName": "b"}',  # a key twice
        b'{"userName": "a\\u0000b"}',  # NUL
        b'{"userName": "\\ud800"}',  # a lone surrogate
        b'{"n": NaN}',
        b"[" * 300 + b"]" * 300,
        b"[" * 100000 + b"]" * 100000,
        b'{"n": ' + b"9" * 5000 + b"}",
        b"{",
    ],
)
def test_a_body_an_attacker_shapes_is_400_invalid_syntax_or_value(raw: bytes) -> None:
    error = _error(parse_body, raw)
    assert error.status == 400
    assert error.scim_type in ("invalidSyntax", "invalidValue")


def test_a_body_at_the_depth_limit_parses() -> None:
    raw = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert parse_body(raw.encode()) is not None
    _error(parse_body, ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)).encode())


def test_attribute_names_resolve_to_one_spelling() -> None:
    doc = {
        "SCHEMAS": [CORE_USER, ENTERPRISE],
        "USERNAME": "bjensen",
        f"{CORE_USER}:title": "boss",
        f"{ENTERPRISE}:manager": {"VALUE": "m1"},
        ENTERPRISE.upper(): {"EmployeeNumber": "7"},
        "Emails": [{"Value": "b@example.org", "TYPE": "work"}],
    }
    out = canonical_resource(doc, USER)
    assert out.attrs == {
        "schemas": [CORE_USER, ENTERPRISE],
        "userName": "bjensen",
        "title": "boss",
        "emails": [{"value": "b@example.org", "type": "work"}],
        ENTERPRISE: {"manager": {"value": "m1"}, "employeeNumber": "7"},
    }
    assert AttrRef(None, "title") in out.written
    assert AttrRef(ENTERPRISE, "manager") in out.written


@pytest.mark.parametrize(
    "doc",
    [
        {"displayName": "a", "DISPLAYNAME": "b"},
        {"title": "a", f"{CORE_USER}:title": "b"},
        {f"{ENTERPRISE}:manager": {"value": "a"}, ENTERPRISE: {"manager": {"value": "b"}}},
        {"emails": [{"value": "a", "VALUE": "b"}]},
    ],
)
def test_two_keys_naming_one_attribute_are_400_invalid_syntax(doc: dict[str, Any]) -> None:
    assert _error(canonical_resource, doc, USER).scim_type == "invalidSyntax"


def test_a_member_with_value_and_VALUE_is_refused() -> None:
    doc = {"displayName": "g", "members": [{"value": "a", "VALUE": "b"}]}
    assert _error(canonical_resource, doc, GROUP).scim_type == "invalidSyntax"


def test_a_urn_qualified_externalId_is_the_domain_s_own_never_home_s() -> None:
    out = canonical_resource({f"{CORE_USER}:externalId": "mine", "userName": "x"}, USER)
    assert out.external_id == ("mine",)
    assert "externalId" not in json.dumps(out.attrs)


def test_id_and_meta_are_dropped_and_unknown_attributes_refused() -> None:
    out = canonical_resource({"ID": "x", "Meta": {"location": "y"}, "userName": "u"}, USER)
    assert out.attrs == {"userName": "u"}
    assert _error(canonical_resource, {"userName": "u", "isAdmin": True}, USER).status == 400


def test_a_complex_attribute_nested_deeper_than_its_schema_is_refused() -> None:
    _error(canonical_resource, {"name": {"givenName": {"x": {"y": 1}}}}, USER)
    _error(canonical_resource, {"emails": [{"value": ["a"]}]}, USER)


def test_patch_keys_and_op_names_are_case_insensitive_and_canonical() -> None:
    body = {
        "SCHEMAS": [PATCH_OP],
        "operations": [
            {"OP": "Replace", "Path": f"{CORE_USER}:TITLE", "VALUE": "x"},
            {"op": "add", "value": {f"{CORE_GROUP}:members": [{"value": "m"}]}},
        ],
    }
    user = canonical_patch({**body, "operations": body["operations"][:1]}, USER)
    assert user.body["Operations"] == [{"op": "replace", "path": "title", "value": "x"}]
    assert user.written == {AttrRef(None, "title")}
    group = canonical_patch({**body, "operations": body["operations"][1:]}, GROUP)
    assert group.body["Operations"] == [{"op": "add", "value": {"members": [{"value": "m"}]}}]
    assert group.written == {AttrRef(None, "members")}


def test_patch_op_keys_given_twice_or_unknown_are_refused() -> None:
    twice = {"schemas": [PATCH_OP], "Operations": [{"op": "add", "OP": "remove", "value": {}}]}
    assert _error(canonical_patch, twice, USER).scim_type == "invalidSyntax"
    extra = {"schemas": [PATCH_OP], "Operations": [{"op": "add", "value": {}}], "x": 1}
    assert _error(canonical_patch, extra, USER).scim_type == "invalidSyntax"


@pytest.mark.parametrize("path", ["meta.location", "meta", "ID", f"{CORE_USER}:id"])
def test_patching_a_read_only_attribute_is_400_mutability(path: str) -> None:
    body = {"schemas": [PATCH_OP], "Operations": [{"op": "replace", "path": path, "value": "x"}]}
    assert _error(canonical_patch, body, USER).scim_type == "mutability"


def test_a_patch_path_naming_an_unknown_attribute_is_400_invalid_path() -> None:
    body = {"schemas": [PATCH_OP], "Operations": [{"op": "replace", "path": "isAdmin", "value": 1}]}
    assert _error(canonical_patch, body, USER).scim_type == "invalidPath"


def test_patch_filters_are_recorded_for_the_read_list() -> None:
    body = {
        "schemas": [PATCH_OP],
        "Operations": [{"op": "remove", "path": 'EMAILS[value sw "a"]'}],
    }
    out = canonical_patch(body, USER)
    assert out.filtered == {AttrRef(None, "emails")}
    assert out.body["Operations"][0]["path"].startswith("emails[")


def _spellings(name: str, urn: str) -> st.SearchStrategy[str]:
    flipped = st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(
            c.upper() if f else c.lower() for c, f in zip(name, flips, strict=True)
        )
    )
    return st.one_of(flipped, flipped.map(lambda n: f"{urn}:{n}"))


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(
    title=_spellings("title", CORE_USER),
    user=_spellings("userName", CORE_USER),
    manager=_spellings("manager", ENTERPRISE),
)
def test_every_spelling_of_an_attribute_gives_the_same_canonical_resource(
    title: str, user: str, manager: str
) -> None:
    doc = {user: "u", title: "t", manager: {"value": "m"}}
    expected = {"userName": "u", "title": "t", ENTERPRISE: {"manager": {"value": "m"}}}
    assert canonical_resource(doc, USER).attrs == expected


def test_the_text_and_path_checks_refuse_exactly_the_characters_they_name() -> None:
    """Every code point, against the rule written out: check_text refuses a control character
    other than tab and newlines, or a lone surrogate; a path segment refuses any control
    character (both searched by an expression since issue 15)."""
    for point in range(0x110000):
        char = chr(point)
        refused = (point < 0x20 and char not in "\t\n\r") or 0xD800 <= point <= 0xDFFF
        try:
            check_text(f"a{char}b", "the value")
        except InvalidValueError:
            assert refused, hex(point)
        else:
            assert not refused, hex(point)
        if point < 0x80:
            in_path = f"/scim/v2/Users/a{quote(char, safe='')}b"
            segment_refused = point < 0x20 or point == 0x7F or char in "/?#\\"
            try:
                path_segments(in_path)
            except InvalidValueError:
                assert segment_refused, hex(point)
            else:
                assert not segment_refused, hex(point)
