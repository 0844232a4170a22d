"""SCIM events (RFC 9967) from resource changes: what changed, who cares, and the SET claims."""

from __future__ import annotations

import uuid
from types import MappingProxyType
from typing import Any

import pytest

from broker.events.sets import (
    EVENT_URIS,
    SUPPORTED_EVENT_URIS,
    Change,
    EventKind,
    describe_change,
    domain_txn,
    interesting,
    service_provider_config_events,
    set_claims,
)

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"


def user(**attributes: Any) -> dict[str, Any]:
    """A home User document with server-managed members that must never count as a change."""
    return {
        "schemas": [CORE_USER],
        "id": "2819c223-7f76-453a-919d-413861904646",
        "meta": {"resourceType": "User", "version": 'W/"1"', "lastModified": "2026-01-01T00:00Z"},
        **attributes,
    }


# --- event URIs (RFC 9967 sections 2.4.1 to 2.4.6, registry in section 7.4) -----------------


def test_event_uris_are_the_registered_provisioning_event_uris() -> None:
    assert dict(EVENT_URIS) == {
        (EventKind.CREATE, "notice"): "urn:ietf:params:scim:event:prov:create:notice",
        (EventKind.CREATE, "full"): "urn:ietf:params:scim:event:prov:create:full",
        (EventKind.PATCH, "notice"): "urn:ietf:params:scim:event:prov:patch:notice",
        (EventKind.PATCH, "full"): "urn:ietf:params:scim:event:prov:patch:full",
        (EventKind.PUT, "notice"): "urn:ietf:params:scim:event:prov:put:notice",
        (EventKind.PUT, "full"): "urn:ietf:params:scim:event:prov:put:full",
        (EventKind.DELETE, "notice"): "urn:ietf:params:scim:event:prov:delete",
        (EventKind.DELETE, "full"): "urn:ietf:params:scim:event:prov:delete",
        (EventKind.ACTIVATE, "notice"): "urn:ietf:params:scim:event:prov:activate",
        (EventKind.ACTIVATE, "full"): "urn:ietf:params:scim:event:prov:activate",
        (EventKind.DEACTIVATE, "notice"): "urn:ietf:params:scim:event:prov:deactivate",
        (EventKind.DEACTIVATE, "full"): "urn:ietf:params:scim:event:prov:deactivate",
    }
    assert len(SUPPORTED_EVENT_URIS) == len(set(SUPPORTED_EVENT_URIS)) == 9


# --- describe_change ----------------------------------------------------------------------------


def test_a_delete_hint_or_a_missing_current_document_is_a_delete() -> None:
    expected = Change(kinds=(EventKind.DELETE,), attributes=())
    assert describe_change(user(userName="bjensen"), None, None) == expected
    assert describe_change(user(userName="bjensen"), user(userName="bjensen"), "delete") == expected
    assert describe_change(None, None, "delete") == expected


def test_a_first_document_is_a_create_naming_every_assigned_attribute() -> None:
    change = describe_change(
        None,
        user(
            userName="dave_%",
            name={"familyName": "Jensen"},
            emails=[{"value": "b@example.com"}],
            nickName=None,
            phoneNumbers=[],
            **{ENTERPRISE: {"manager": {"value": "26118915-6090-4610-87e4-49d8ca9f808d"}}},
        ),
        "create",
    )
    assert change == Change(
        kinds=(EventKind.CREATE,),
        attributes=("emails", "name", f"{ENTERPRISE}:manager", "userName"),
    )


def test_a_create_with_an_active_user_is_only_a_create() -> None:
    change = describe_change(None, user(userName="bjensen", active=True), None)
    assert change is not None and change.kinds == (EventKind.CREATE,)
    assert change.attributes == ("active", "userName")


@pytest.mark.parametrize(
    ("hint", "kind"),
    [("put", EventKind.PUT), ("patch", EventKind.PATCH), (None, EventKind.PATCH)],
)
def test_the_hint_chooses_put_or_patch_and_a_poller_s_unknown_verb_is_a_patch(
    hint: str | None, kind: EventKind
) -> None:
    change = describe_change(
        user(userName="bjensen", name={"familyName": "Jensen"}),
        user(userName="bjensen", name={"familyName": "Jensen-Smith"}),
        hint,
    )
    assert change == Change(kinds=(kind,), attributes=("name",))


def test_added_removed_and_revised_attributes_are_all_named_and_sorted() -> None:
    change = describe_change(
        user(userName="bjensen", title="Tour Guide", displayName="Babs"),
        user(userName="bjensen", displayName="Barbara", nickName="Babs"),
        "put",
    )
    assert change == Change(kinds=(EventKind.PUT,), attributes=("displayName", "nickName", "title"))


def test_extension_attributes_are_compared_one_by_one_under_their_full_name() -> None:
    before = user(
        userName="bjensen",
        **{ENTERPRISE: {"employeeNumber": "701984", "manager": {"value": "m-1"}}},
    )
    after = user(
        userName="bjensen",
        **{ENTERPRISE: {"employeeNumber": "701984", "manager": {"value": "m-2"}}},
    )
    assert describe_change(before, after, None) == Change(
        kinds=(EventKind.PATCH,), attributes=(f"{ENTERPRISE}:manager",)
    )


def test_removing_an_extension_names_each_of_its_attributes() -> None:
    before = user(userName="bjensen", **{ENTERPRISE: {"employeeNumber": "7", "costCenter": "4"}})
    change = describe_change(before, user(userName="bjensen"), "put")
    assert change == Change(
        kinds=(EventKind.PUT,),
        attributes=(f"{ENTERPRISE}:costCenter", f"{ENTERPRISE}:employeeNumber"),
    )


def test_deactivating_with_other_changes_is_a_patch_and_a_deactivate() -> None:
    change = describe_change(
        user(userName="bjensen", active=True),
        user(userName="bjensen2", active=False),
        None,
    )
    assert change == Change(
        kinds=(EventKind.PATCH, EventKind.DEACTIVATE), attributes=("active", "userName")
    )


def test_a_put_that_activates_is_a_put_and_an_activate() -> None:
    change = describe_change(
        user(userName="bjensen", active=False),
        user(userName="bjensen", title="Boss", active=True),
        "put",
    )
    assert change == Change(
        kinds=(EventKind.PUT, EventKind.ACTIVATE), attributes=("active", "title")
    )


@pytest.mark.parametrize(
    ("before", "after", "kind"),
    [
        ({"active": True}, {"active": False}, EventKind.DEACTIVATE),
        ({"active": False}, {"active": True}, EventKind.ACTIVATE),
        ({}, {"active": True}, EventKind.ACTIVATE),
        ({"active": None}, {"active": True}, EventKind.ACTIVATE),
        ({"active": True}, {}, EventKind.DEACTIVATE),
    ],
)
def test_a_change_of_active_alone_is_only_an_activate_or_a_deactivate(
    before: dict[str, Any], after: dict[str, Any], kind: EventKind
) -> None:
    change = describe_change(user(userName="u", **before), user(userName="u", **after), "patch")
    assert change == Change(kinds=(kind,), attributes=("active",))


def test_active_going_from_unassigned_to_false_is_a_plain_patch() -> None:
    change = describe_change(user(userName="u"), user(userName="u", active=False), None)
    assert change == Change(kinds=(EventKind.PATCH,), attributes=("active",))


def test_a_string_true_is_not_an_activation() -> None:
    change = describe_change(user(userName="u"), user(userName="u", active="true"), None)
    assert change == Change(kinds=(EventKind.PATCH,), attributes=("active",))


def test_only_meta_id_or_schemas_changing_is_no_change() -> None:
    before = user(userName="bjensen")
    after = {
        **user(userName="bjensen"),
        "id": "another-id",
        "meta": {"version": 'W/"2"'},
        "schemas": [CORE_USER, ENTERPRISE],
    }
    assert describe_change(before, after, None) is None
    assert describe_change(before, dict(before), "put") is None


def test_null_empty_and_absent_are_the_same_state() -> None:
    before = user(userName="u", nickName=None, emails=[], name={})
    assert describe_change(before, user(userName="u"), None) is None
    assert (
        describe_change(user(userName="u", name={"middleName": None}), user(userName="u"), None)
        is None
    )


def test_reordered_multi_valued_attributes_and_recased_names_are_no_change() -> None:
    before = user(
        userName="u",
        emails=[{"value": "a@example.com", "type": "work"}, {"value": "b@example.com"}],
    )
    after = user(
        UserName="u",
        Emails=[{"value": "b@example.com"}, {"Type": "work", "value": "a@example.com"}],
    )
    assert describe_change(before, after, None) is None


def test_values_still_compare_case_sensitively() -> None:
    change = describe_change(user(userName="bjensen"), user(userName="BJensen"), None)
    assert change == Change(kinds=(EventKind.PATCH,), attributes=("userName",))


def test_a_create_hint_for_a_recorded_resource_is_a_diff() -> None:
    before = user(userName="u")
    assert describe_change(before, user(userName="u"), "create") is None
    change = describe_change(before, user(userName="v"), "create")
    assert change == Change(kinds=(EventKind.PATCH,), attributes=("userName",))


def test_an_unknown_hint_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown change hint 'POST'"):
        describe_change(None, user(userName="u"), "POST")


# --- interesting --------------------------------------------------------------------------------

PATCH_NAME = Change(kinds=(EventKind.PATCH,), attributes=("name",))
PATCH_MANAGER = Change(kinds=(EventKind.PATCH,), attributes=(f"{ENTERPRISE}:manager",))


def test_without_an_interest_list_every_change_is_interesting() -> None:
    assert interesting(PATCH_NAME, None)


@pytest.mark.parametrize(
    "kinds",
    [
        (EventKind.CREATE,),
        (EventKind.DELETE,),
        (EventKind.ACTIVATE,),
        (EventKind.PATCH, EventKind.DEACTIVATE),
    ],
)
def test_lifecycle_events_are_always_interesting(kinds: tuple[EventKind, ...]) -> None:
    assert interesting(Change(kinds=kinds, attributes=("active",)), ["emails"])
    assert interesting(Change(kinds=kinds, attributes=()), [])


@pytest.mark.parametrize(
    "interest",
    [
        "name",
        "NAME",
        "name.familyName",
        f"{CORE_USER}:name",
        f"{CORE_USER}:name.givenName",
        CORE_USER,
    ],
)
def test_a_core_attribute_matches_by_its_top_level_name(interest: str) -> None:
    assert interesting(PATCH_NAME, ["emails", interest])


@pytest.mark.parametrize("interest", ["nickName", "names", "nam", "emails", ENTERPRISE])
def test_an_unrelated_name_does_not_match(interest: str) -> None:
    assert not interesting(PATCH_NAME, [interest])


def test_a_filtered_value_path_matches_its_attribute() -> None:
    change = Change(kinds=(EventKind.PUT,), attributes=("emails",))
    assert interesting(change, ['emails[type eq "work:home"].value'])
    assert not interesting(change, ['phoneNumbers[value eq "emails"]'])


@pytest.mark.parametrize(
    "interest",
    [
        f"{ENTERPRISE}:manager",
        f"{ENTERPRISE}:manager.value",
        f"{ENTERPRISE.upper()}:MANAGER",
        ENTERPRISE,
    ],
)
def test_an_extension_attribute_matches_by_its_full_name_or_its_schema(interest: str) -> None:
    assert interesting(PATCH_MANAGER, [interest])


@pytest.mark.parametrize("interest", ["manager", f"{ENTERPRISE}:employeeNumber", CORE_USER])
def test_an_extension_attribute_is_not_matched_by_a_bare_or_other_name(interest: str) -> None:
    assert not interesting(PATCH_MANAGER, [interest])


# --- set_claims ---------------------------------------------------------------------------------

COMMON: dict[str, Any] = {
    "issuer": "https://broker.example.com",
    "audience": "peer-a",
    "jti": "4d3559ec67504aaba65d40b0363faad8",
    "txn": "b7b953f11cc6489bbfb87834747cc4c1",
    "issued_at": 1458496404,
}


def test_a_notice_names_the_attributes_and_identifies_the_subject_by_sub_id() -> None:
    claims = set_claims(
        **COMMON,
        uri="/Groups/176f397ec4c44b94b2cfcb759780b8c2",
        external_id="crmUsers",
        change=Change(kinds=(EventKind.PATCH,), attributes=("members",)),
        detail="notice",
        version="a330bc54f0671c9",
    )
    assert claims == {
        "iss": "https://broker.example.com",
        "aud": "peer-a",
        "jti": "4d3559ec67504aaba65d40b0363faad8",
        "iat": 1458496404,
        "txn": "b7b953f11cc6489bbfb87834747cc4c1",
        "sub_id": {
            "format": "scim",
            "uri": "/Groups/176f397ec4c44b94b2cfcb759780b8c2",
            "externalId": "crmUsers",
        },
        "events": {
            "urn:ietf:params:scim:event:prov:patch:notice": {
                "attributes": ["members"],
                "version": "a330bc54f0671c9",
            }
        },
    }
    assert "sub" not in claims


def test_full_detail_carries_the_data_and_never_the_attributes() -> None:
    data = MappingProxyType({"schemas": (CORE_USER,), "id": "ext-1", "userName": "jdoe"})
    claims = set_claims(
        **COMMON,
        uri="/Users/ext-1",
        external_id=None,
        change=Change(kinds=(EventKind.CREATE,), attributes=("userName",)),
        detail="full",
        data=data,
    )
    assert claims["sub_id"] == {"format": "scim", "uri": "/Users/ext-1"}
    assert claims["events"] == {
        "urn:ietf:params:scim:event:prov:create:full": {
            "data": {"schemas": [CORE_USER], "id": "ext-1", "userName": "jdoe"}
        }
    }


def test_full_detail_without_data_falls_back_to_a_notice() -> None:
    claims = set_claims(
        **COMMON,
        uri="/Users/ext-1",
        external_id="jdoe",
        change=Change(kinds=(EventKind.PUT,), attributes=("emails", "userName")),
        detail="full",
    )
    assert claims["events"] == {
        "urn:ietf:params:scim:event:prov:put:notice": {"attributes": ["emails", "userName"]}
    }


@pytest.mark.parametrize("detail", ["notice", "full"])
def test_a_delete_has_one_uri_and_no_payload(detail: Any) -> None:
    claims = set_claims(
        **COMMON,
        uri="/Users/ext-1",
        external_id="jDoe",
        change=Change(kinds=(EventKind.DELETE,), attributes=()),
        detail=detail,
        data={"userName": "must not appear"},
        version='W/"9"',
    )
    assert claims["events"] == {"urn:ietf:params:scim:event:prov:delete": {}}


def test_a_patch_with_a_deactivation_is_one_set_with_both_events() -> None:
    claims = set_claims(
        **COMMON,
        uri="/Users/ext-1",
        external_id=None,
        change=Change(kinds=(EventKind.PATCH, EventKind.DEACTIVATE), attributes=("active",)),
        detail="full",
        data={"userName": "jdoe", "active": False},
    )
    assert claims["events"] == {
        "urn:ietf:params:scim:event:prov:patch:full": {
            "data": {"userName": "jdoe", "active": False}
        },
        "urn:ietf:params:scim:event:prov:deactivate": {},
    }


def test_an_activation_alone_has_an_empty_payload() -> None:
    claims = set_claims(
        **COMMON,
        uri="/Users/ext-1",
        external_id=None,
        change=Change(kinds=(EventKind.ACTIVATE,), attributes=("active",)),
        detail="notice",
    )
    assert claims["events"] == {"urn:ietf:params:scim:event:prov:activate": {}}


# --- ServiceProviderConfig ----------------------------------------------------------------------


def test_the_service_provider_config_advertises_security_events() -> None:
    assert service_provider_config_events() == {
        "securityEvents": {
            "asyncRequest": "none",
            "eventUris": [
                "urn:ietf:params:scim:event:prov:create:notice",
                "urn:ietf:params:scim:event:prov:create:full",
                "urn:ietf:params:scim:event:prov:patch:notice",
                "urn:ietf:params:scim:event:prov:patch:full",
                "urn:ietf:params:scim:event:prov:put:notice",
                "urn:ietf:params:scim:event:prov:put:full",
                "urn:ietf:params:scim:event:prov:delete",
                "urn:ietf:params:scim:event:prov:activate",
                "urn:ietf:params:scim:event:prov:deactivate",
            ],
        }
    }
    only = service_provider_config_events(
        event_uris=[EVENT_URIS[EventKind.DELETE, "notice"]] * 2, async_request="request"
    )
    assert only == {
        "securityEvents": {
            "asyncRequest": "request",
            "eventUris": ["urn:ietf:params:scim:event:prov:delete"],
        }
    }


# --- domain_txn (RFC 8417 section 2.2, per domain) -----------------------------------------------

TXN_KEY = bytes(range(32))
CHANGE_TXN = "0f5d8a62-3a1e-4c39-9d0b-6f3a2b1c0e77"


def test_each_domain_has_its_own_txn_for_one_change() -> None:
    txns = {domain_txn(TXN_KEY, domain=d, txn=CHANGE_TXN) for d in ("D", "E", "F", "peer-a")}
    assert len(txns) == 4
    assert CHANGE_TXN not in txns


def test_one_domains_sets_for_one_change_share_its_txn() -> None:
    # Every SET of one transaction to one domain carries the same txn (RFC 8417 section 2.2),
    # however often and whenever it is computed; another change, another txn.
    assert domain_txn(TXN_KEY, domain="D", txn=CHANGE_TXN) == domain_txn(
        TXN_KEY, domain="D", txn=CHANGE_TXN
    )
    other = "a8f5f167-f44f-4964-9e2b-8c1e5d4e2f10"
    assert domain_txn(TXN_KEY, domain="D", txn=CHANGE_TXN) != domain_txn(
        TXN_KEY, domain="D", txn=other
    )


def test_a_domain_txn_looks_like_a_change_txn_and_needs_the_key() -> None:
    txn = domain_txn(TXN_KEY, domain="D", txn=CHANGE_TXN)
    assert uuid.UUID(txn).version == 4 and str(uuid.UUID(txn)) == txn
    assert domain_txn(bytes(32), domain="D", txn=CHANGE_TXN) != txn


def test_domain_and_txn_cannot_be_traded_for_each_other() -> None:
    # The two are kept apart by a newline, which no domain name holds.
    assert domain_txn(TXN_KEY, domain="DE", txn="x") != domain_txn(TXN_KEY, domain="D", txn="Ex")
