"""The document rewriter, pure: every place an ID can hide in a resource, both ways."""

from __future__ import annotations

import pytest

from broker.scim.rewrite import (
    Endpoints,
    InvisibleResource,
    Translation,
    UnknownReference,
    collect_ids,
    rewrite_document,
)
from broker.scim.schemas import DEFAULT_REFERENCES, ENTERPRISE_USER, ReferenceMap

HOME = "http://home.internal/scim/v2"
BROKER = "https://broker.example/scim/v2"
CUSTOM = "urn:example:params:scim:schemas:extension:sponsorship:2.0:User"

SCHEMAS = [
    {
        "id": "urn:ietf:params:scim:schemas:core:2.0:Group",
        "attributes": [
            {"name": "displayName", "type": "string"},
            {
                "name": "members",
                "type": "complex",
                "multiValued": True,
                "subAttributes": [
                    {"name": "value", "type": "string"},
                    {"name": "$ref", "type": "reference", "referenceTypes": ["User", "Group"]},
                ],
            },
        ],
    },
    {
        "id": CUSTOM,
        "attributes": [
            {"name": "sponsor", "type": "reference", "referenceTypes": ["User"]},
            {"name": "homepage", "type": "reference", "referenceTypes": ["external"]},
        ],
    },
]
REFS = ReferenceMap.from_schemas(
    SCHEMAS, [{"name": "User", "schemaExtensions": [{"schema": CUSTOM}]}]
)

INWARD = Translation(DEFAULT_REFERENCES, Endpoints.default(), BROKER, HOME)
INTERNAL = {"u-1": "ext-u1", "u-2": "ext-u2", "g-1": "ext-g1", "boss": "ext-boss"}


def outbound(
    doc: dict, refs: ReferenceMap = DEFAULT_REFERENCES, table: dict[str, str] = INTERNAL
) -> dict:
    return rewrite_document(
        doc, Translation(refs, Endpoints.default(), HOME, BROKER), lambda i, _t: table.get(i)
    )


def test_a_user_with_groups_and_an_enterprise_manager_is_rewritten_everywhere() -> None:
    user = {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE_USER],
        "id": "u-1",
        "userName": "bjensen",
        "groups": [{"value": "g-1", "$ref": f"{HOME}/Groups/g-1", "display": "Admins"}],
        ENTERPRISE_USER: {
            "employeeNumber": "7",
            "manager": {"value": "boss", "$ref": f"{HOME}/Users/boss"},
        },
        "meta": {"resourceType": "User", "location": f"{HOME}/Users/u-1", "version": 'W/"3"'},
    }
    assert outbound(user) == {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE_USER],
        "id": "ext-u1",
        "userName": "bjensen",
        "groups": [{"value": "ext-g1", "$ref": f"{BROKER}/Groups/ext-g1", "display": "Admins"}],
        ENTERPRISE_USER: {
            "employeeNumber": "7",
            "manager": {"value": "ext-boss", "$ref": f"{BROKER}/Users/ext-boss"},
        },
        "meta": {"resourceType": "User", "location": f"{BROKER}/Users/ext-u1", "version": 'W/"3"'},
    }


def test_group_members_of_both_types_and_missing_ones_left_out() -> None:
    group = {
        "id": "g-1",
        "members": [
            {"value": "u-1", "$ref": f"{HOME}/Users/u-1", "type": "User"},
            {"value": "hidden", "$ref": f"{HOME}/Users/hidden", "type": "User"},
            {"value": "g-1", "type": "Group"},
        ],
        "meta": {"resourceType": "Group"},
    }
    out = outbound(group)
    assert out["members"] == [
        {"value": "ext-u1", "$ref": f"{BROKER}/Users/ext-u1", "type": "User"},
        {"value": "ext-g1", "type": "Group"},
    ]


def test_schema_declared_reference_attributes_in_an_extension_are_rewritten() -> None:
    doc = {
        "id": "u-2",
        CUSTOM: {"sponsor": f"{HOME}/Users/boss", "homepage": "https://example.org/u-1"},
    }
    out = outbound(doc, REFS)
    assert out[CUSTOM] == {
        "sponsor": f"{BROKER}/Users/ext-boss",
        "homepage": "https://example.org/u-1",
    }


def test_an_invisible_resource_and_an_unparseable_reference_fail_closed() -> None:
    with pytest.raises(InvisibleResource):
        outbound({"id": "nobody"})
    out = outbound({"id": "u-1", "groups": [{"value": "g-1", "$ref": "http://elsewhere/x/g-1"}]})
    assert out["groups"] == [{"value": "ext-g1", "$ref": f"{BROKER}/Groups/ext-g1"}]
    # A reference whose target cannot be told is not passed on.
    out = outbound({"id": "u-1", "members": [{"value": "u-2", "$ref": "urn:odd:u-2"}]})
    assert out["members"] == [{"value": "ext-u2"}]


def test_inbound_unknown_member_is_an_invalid_value_naming_what_was_sent() -> None:
    reverse = {v: k for k, v in INTERNAL.items()}
    group = {"displayName": "x", "members": [{"value": "ext-u1"}, {"value": "guess"}]}
    with pytest.raises(UnknownReference, match="members: 'guess'") as caught:
        rewrite_document(group, INWARD, lambda i, _t: reverse.get(i), strict=True)
    assert caught.value.status == 400 and caught.value.scim_type == "invalidValue"


def test_collect_finds_every_id_with_its_type() -> None:
    doc = {
        "id": "g-1",
        "meta": {"resourceType": "Group", "location": f"{HOME}/Groups/g-1"},
        "members": [
            {"value": "u-1", "type": "User"},
            {"value": "g-9", "$ref": f"{HOME}/Groups/g-9"},
        ],
        ENTERPRISE_USER: {"manager": {"value": "boss"}},
    }
    assert collect_ids(doc, INWARD.reversed()) == {
        "u-1": "User",
        "g-9": "Group",
        "boss": "User",
        "g-1": "Group",
    }


def test_attribute_names_are_case_insensitive() -> None:
    out = outbound({"id": "u-1", "Groups": [{"Value": "g-1"}]})
    assert out["Groups"] == [{"Value": "ext-g1"}]


def test_reference_map_reads_the_home_schemas() -> None:
    assert REFS.attribute("members") is not None and REFS.attribute("members").complex
    assert REFS.attribute("sponsor", CUSTOM) is not None
    assert REFS.attribute("homepage", CUSTOM) is None  # external references are not IDs
