"""The console's pure decisions: what a search names, the cookie, the CSRF check, the seed's
table with what a plan changes, a delivery's reason in words."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from broker.console.core import (
    Lookup,
    age,
    cookie_options,
    csrf_ok,
    delivery_reason,
    parse_lookup,
    seed_table,
    split_moves_from_form,
)
from broker.console.forms import add_body, domain_form, update_body
from broker.console.shell import safe_next
from broker.domains import Domain
from broker.mapping.rules import MappingRow, MappingState, apply_plan, plan_merge

DOMAINS = ["H", "P1", "P2"]


def test_a_known_domain_before_the_colon_names_that_domains_external_id() -> None:
    assert parse_lookup(" P2:ff487230b3a0 ", DOMAINS) == Lookup("external", "ff487230b3a0", "P2")
    # a colon inside an ID of no known domain is no domain prefix
    assert parse_lookup("urn:x:1", DOMAINS) == Lookup("internal", "urn:x:1")
    assert parse_lookup("P2:", DOMAINS) == Lookup("internal", "P2:")


def test_an_email_is_asked_of_home_and_anything_else_is_an_internal_id_first() -> None:
    assert parse_lookup("dave_%@example.org", DOMAINS) == Lookup("email", "dave_%@example.org")
    assert parse_lookup("9caf78aac3d6", DOMAINS) == Lookup("internal", "9caf78aac3d6")
    assert parse_lookup("   ", DOMAINS) is None


def test_the_cookie_is_httponly_strict_and_secure_only_behind_https() -> None:
    options = cookie_options(secure=True, max_age=timedelta(hours=8))
    assert options == {
        "httponly": True,
        "samesite": "Strict",
        "secure": True,
        "path": "/console",
        "max_age": 28800,
    }
    assert cookie_options(secure=False, max_age=timedelta(hours=1))["secure"] is False


def test_the_csrf_token_must_be_the_sessions() -> None:
    assert csrf_ok("abc", "abc")
    for wrong in ("", "abd", "ab", None, ["abc"], 1):
        assert not csrf_ok("abc", wrong)
    assert not csrf_ok("", ""), "no session token: nothing matches"
    assert not csrf_ok(None, "abc")


def test_after_sign_in_only_a_console_path_is_a_destination() -> None:
    assert safe_next("/console/identity?q=x") == "/console/identity?q=x"
    for hostile in ("https://evil.example/", "//evil.example/console/", "/admin/merges", None):
        assert safe_next(hostile) == "/console/"
    assert safe_next("/console/\\evil") == "/console/"


def test_the_seeds_false_negative_drawn_before_and_after_with_its_tasks() -> None:
    rows = [
        MappingRow("9caf78aac3d6", "D2", "ff487230b3a0", True),
        MappingRow("273d36e30d09", "D2", "41206cc97c8b", True),
    ]
    plan = plan_merge("9caf78aac3d6", ["273d36e30d09"], rows, push_domains={"D2"})
    after = seed_table(apply_plan(rows, plan), rows)
    assert [
        (r.internal_id, r.domain, r.external_id, r.primary, r.state, r.change) for r in after
    ] == [
        ("9caf78aac3d6", "D2", "ff487230b3a0", True, "active", ""),
        ("9caf78aac3d6", "D2", "41206cc97c8b", False, "deletion_required", "changed"),
    ]


def test_a_removed_row_and_a_pending_create_are_drawn() -> None:
    pending = MappingRow("a", "P1", None, True, MappingState.PENDING_CREATE)
    table = seed_table([], [pending])
    assert [(r.external_id, r.change) for r in table] == [("(pending create)", "removed")]


def test_split_moves_take_the_ticked_rows_to_the_new_entity() -> None:
    assert split_moves_from_form("n", ["P2:41206cc97c8b", "junk", "P1:a:b"]) == {
        "n": [("P2", "41206cc97c8b"), ("P1", "a:b")]
    }


def test_a_delivery_reason_and_the_peers_answer() -> None:
    last_error = {
        "reason": "POST /Users: HTTP 403; check the credential's permissions",
        "status": 403,
        "peer_error": {"status": "403", "detail": "injected"},
    }
    assert delivery_reason(last_error) == (last_error["reason"], "403 injected")
    assert delivery_reason({"reason": "r", "status": 502}) == ("r", "HTTP 502")
    assert delivery_reason(None) == ("", "")


def test_ages_in_the_largest_whole_unit() -> None:
    now = datetime(2026, 12, 5, 12, tzinfo=UTC)
    assert age(now - timedelta(seconds=42), now) == "42 s"
    assert age(now - timedelta(minutes=5), now) == "5 min"
    assert age(now - timedelta(hours=3), now) == "3 h"
    assert age(now - timedelta(days=3), now) == "3 d"
    assert age(None, now) == ""


def _domain(**settings: object) -> Domain:
    base: dict[str, object] = {
        "id": "P1",
        "kind": "peer",
        "scim_url": "https://p1.example/v2",
        "credential_ref": "env:P1_TOKEN",
        "push": True,
        "scope_filter": None,
        "attribute_policy": {"read": ["userName", "emails"]},
        "status": "active",
        "created_at": datetime(2026, 12, 5, tzinfo=UTC),
    }
    return Domain(**{**base, **settings})  # type: ignore[arg-type]


def test_a_domain_form_round_trips_and_only_what_changed_is_sent() -> None:
    current = domain_form(_domain())
    assert current["token_env"] == "P1_TOKEN" and current["read_attributes"] == "userName, emails"
    assert current["suspend_for"] == "30d" and current["push"] == "on"
    assert update_body(current, current) == {}
    edited = {**current, "scope": 'userName sw "a"', "read_attributes": ""}
    assert update_body(edited, current) == {"scope": 'userName sw "a"', "read_attributes": None}
    moved = {**current, "token_env": "", "token_file": "/run/p1.token"}
    assert update_body(moved, current) == {"token_env": None, "token_file": "/run/p1.token"}
    unticked = {k: v for k, v in current.items() if k != "push"}  # a browser omits it
    assert update_body(unticked, current) == {"push": False}
    assert update_body({**current, "deprovision": ""}, current) == {}


def test_a_new_domains_form_keeps_what_was_filled_in() -> None:
    assert add_body({"scim_url": " https://p.example/v2 ", "read_attributes": "a, ,b"}) == {
        "scim_url": "https://p.example/v2",
        "read_attributes": ["a", "b"],
        "push": False,
        "unlinkable": False,
    }
