"""PATCH requests: paths with value filters and values holding references are rewritten; bad ones refused."""

from __future__ import annotations

from typing import Any

import pytest

from broker.scim.patch import PATCH_OP, PatchError, parse_patch
from broker.scim.rewrite import Endpoints, Translation, UnknownReference
from broker.scim.schemas import DEFAULT_REFERENCES, ENTERPRISE_USER

BROKER = "https://broker.example/scim/v2"
HOME = "http://home.internal/scim/v2"
INWARD = Translation(DEFAULT_REFERENCES, Endpoints.default(), BROKER, HOME)
IDS = {"ext-a": "int-a", "ext-b": "int-b", "ext-g": "int-g"}


def body(*ops: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_OP], "Operations": list(ops)}


def inbound(request: dict[str, Any]) -> dict[str, Any]:
    patch = parse_patch(request)
    return patch.rewrite(
        INWARD,
        translate=lambda i, _t: IDS.get(i),
        ids=IDS,
        external_ids={},
    )


def test_member_values_and_value_filter_paths_are_translated() -> None:
    out = inbound(
        body(
            {
                "op": "add",
                "path": "members",
                "value": [{"value": "ext-a", "$ref": f"{BROKER}/Users/ext-a"}],
            },
            {"op": "remove", "path": 'members[value eq "ext-b"]'},
            {"op": "replace", "path": 'members[value eq "ext-a"].display', "value": "ext-b"},
            {"op": "replace", "value": {"members": [{"value": "ext-g", "type": "Group"}]}},
            {"op": "replace", "path": f"{ENTERPRISE_USER}:manager", "value": {"value": "ext-b"}},
            {"op": "replace", "path": "manager.value", "value": "ext-a"},
        )
    )
    assert out["Operations"] == [
        {
            "op": "add",
            "path": "members",
            "value": [{"value": "int-a", "$ref": f"{HOME}/Users/int-a"}],
        },
        {"op": "remove", "path": 'members[value eq "int-b"]'},
        # display is not an ID: the value stays, the filter is translated
        {"op": "replace", "path": 'members[value eq "int-a"].display', "value": "ext-b"},
        {"op": "replace", "value": {"members": [{"value": "int-g", "type": "Group"}]}},
        {"op": "replace", "path": f"{ENTERPRISE_USER}:manager", "value": {"value": "int-b"}},
        # unqualified, the enterprise manager is still recognised
        {"op": "replace", "path": "manager.value", "value": "int-a"},
    ]


def test_an_unknown_member_in_a_patch_value_is_an_invalid_value() -> None:
    with pytest.raises(UnknownReference, match="members: 'nobody'"):
        inbound(body({"op": "add", "path": "members", "value": [{"value": "nobody"}]}))


def test_external_id_operations_are_kept_for_the_caller_and_not_sent_home() -> None:
    patch = parse_patch(
        body(
            {"op": "replace", "path": "externalId", "value": "mine"},
            {"op": "replace", "value": {"externalId": "x", "active": False}},
        )
    )
    assert patch.external_id == ("x",)
    assert [op.raw for op in patch.operations] == [{"op": "replace", "value": {"active": False}}]
    assert parse_patch(body({"op": "remove", "path": "externalId"})).external_id == (None,)


@pytest.mark.parametrize(
    ("request_body", "scim_type", "message"),
    [
        ([], "invalidSyntax", "JSON object"),
        ({"Operations": [{"op": "add", "value": {}}]}, "invalidValue", "schemas"),
        (body(), "invalidValue", "non-empty Operations"),
        (body({"op": "move", "path": "x"}), "invalidValue", "'move' is not add, remove or replace"),
        (body({"op": "remove"}), "noTarget", "remove needs a path"),
        (body({"op": "add", "path": "members"}), "invalidValue", "add needs a value"),
        (
            body({"op": "add", "path": "members[value eq", "value": 1}),
            "invalidPath",
            "invalid path",
        ),
        (body({"op": "replace", "path": "id", "value": "x"}), "mutability", "id is read-only"),
    ],
)
def test_malformed_patch_requests_are_refused_with_the_right_scim_type(
    request_body: Any, scim_type: str, message: str
) -> None:
    with pytest.raises(PatchError, match=message) as caught:
        parse_patch(request_body)
    assert caught.value.status == 400 and caught.value.scim_type == scim_type


def test_ids_lists_everything_the_operations_name() -> None:
    patch = parse_patch(
        body(
            {"op": "remove", "path": 'members[value eq "ext-b"]'},
            {"op": "add", "path": "members", "value": [{"value": "ext-a", "type": "User"}]},
        )
    )
    found = patch.ids(INWARD)
    assert found.ids == {"ext-b": None, "ext-a": "User"}


def test_a_path_naming_a_whole_extension_rewrites_the_references_inside_it() -> None:
    out = inbound(
        body(
            {
                "op": "add",
                "path": ENTERPRISE_USER,
                "value": {"department": "x", "manager": {"value": "ext-a"}},
            }
        )
    )
    assert out["Operations"][0]["value"] == {"department": "x", "manager": {"value": "int-a"}}
    with pytest.raises(UnknownReference):
        inbound(
            body(
                {"op": "add", "path": ENTERPRISE_USER, "value": {"manager": {"value": "stranger"}}}
            )
        )
