"""What the delivery worker decides between a fetch and an act, as pure functions: no database,
no peer, no clock (the time is an argument)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.propagation.decisions import (
    BULK_DEPTH,
    Created,
    Delete,
    DropPending,
    Link,
    Refused,
    SetRefused,
    Suspend,
    WaitSuspended,
    claim_room,
    copy_outcome,
    create_answer,
    deprovision_step,
    follow_move,
    health_due,
    in_scope,
    link_target,
    membership_move,
    park,
    patient,
    peers_reread,
    plan_update,
    ride_room,
    set_answer,
    sort_references,
    sync_skipped,
    unique_value,
    users_to_scope,
)
from broker.propagation.documents import PATCH_SCHEMA
from broker.propagation.policy import Failure, Verdict, unanswered

CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
T0 = datetime(2025, 1, 1, tzinfo=UTC)

# ------------------------------------------------------------------ lanes


def test_a_lane_claims_up_to_twice_its_concurrency() -> None:
    assert claim_room(concurrency=4, active=0, quarantined=False, paused_until=0, now=10) == 8
    assert claim_room(concurrency=4, active=3, quarantined=False, paused_until=0, now=10) == 5


def test_a_lane_with_its_slots_taken_and_as_many_waiting_claims_nothing() -> None:
    assert claim_room(concurrency=4, active=5, quarantined=False, paused_until=0, now=10) == 0


def test_a_lane_toward_a_peer_taking_bulk_holds_bulk_depth_rounds_and_claims_after_one() -> None:
    lane = {"concurrency": 4, "quarantined": False, "paused_until": 0, "now": 10, "bulk": True}
    assert claim_room(active=0, **lane) == 4 * BULK_DEPTH
    assert claim_room(active=4 * (BULK_DEPTH - 1), **lane) == 4, "a round's worth has finished"
    assert claim_room(active=4 * (BULK_DEPTH - 1) + 1, **lane) == 0
    assert claim_room(active=0, **{**lane, "quarantined": True}) == 1, "still one probe"
    assert claim_room(active=0, **{**lane, "paused_until": 11}) == 0


def test_a_quarantined_peer_gets_one_probe_at_a_time() -> None:
    assert claim_room(concurrency=4, active=0, quarantined=True, paused_until=0, now=10) == 1
    assert claim_room(concurrency=4, active=1, quarantined=True, paused_until=0, now=10) == 0


def test_a_resting_lane_claims_nothing_until_its_pause_is_over() -> None:
    assert claim_room(concurrency=4, active=0, quarantined=False, paused_until=11, now=10) == 0
    assert claim_room(concurrency=4, active=0, quarantined=False, paused_until=10, now=10) == 8


def test_a_lane_takes_along_up_to_its_concurrency_besides_its_own_claims() -> None:
    assert ride_room(concurrency=4, riding=0, quarantined=False, paused_until=0, now=10) == 4
    assert ride_room(concurrency=4, riding=3, quarantined=False, paused_until=0, now=10) == 1
    assert ride_room(concurrency=4, riding=5, quarantined=False, paused_until=0, now=10) == 0


def test_a_lane_toward_a_peer_taking_bulk_takes_twice_its_concurrency_along() -> None:
    lane = {"concurrency": 4, "quarantined": False, "paused_until": 0, "now": 10, "bulk": True}
    assert ride_room(riding=0, **lane) == 8
    assert ride_room(riding=7, **lane) == 1
    assert ride_room(riding=0, **{**lane, "quarantined": True}) == 0


def test_a_quarantined_or_resting_lane_takes_nothing_along() -> None:
    assert ride_room(concurrency=4, riding=0, quarantined=True, paused_until=0, now=10) == 0
    assert ride_room(concurrency=4, riding=0, quarantined=False, paused_until=11, now=10) == 0


@given(
    st.integers(1, 64),
    st.integers(0, 400),
    st.booleans(),
    st.floats(0, 100),
    st.floats(0, 100),
    st.booleans(),
)
def test_a_lane_never_holds_more_than_the_lease_allows(
    concurrency: int, active: int, quarantined: bool, paused_until: float, now: float, bulk: bool
) -> None:
    room = claim_room(
        concurrency=concurrency,
        active=active,
        quarantined=quarantined,
        paused_until=paused_until,
        now=now,
        bulk=bulk,
    )
    assert room >= 0
    if room:
        assert active + room <= (1 if quarantined else (BULK_DEPTH if bulk else 2) * concurrency)
        assert paused_until <= now
        # With what the other lanes take along, at most three rounds of requests wait for the
        # peer's slots (the lease): one write a request without Bulk, two or more with it.
        riding = ride_room(
            concurrency=concurrency, riding=0, quarantined=False, paused_until=0, now=0, bulk=bulk
        )
        assert active + room + riding <= 3 * concurrency * (2 if bulk else 1)


def test_the_peers_are_read_again_each_second_or_soon_after_an_enqueue() -> None:
    assert peers_reread(now=10.0, read_at=9.5, enqueued=False) is None
    assert peers_reread(now=10.0, read_at=9.0, enqueued=False) == 0.0
    assert peers_reread(now=10.0, read_at=9.9, enqueued=True) == 0.0
    delay = peers_reread(now=10.0, read_at=9.98, enqueued=True)
    assert delay is not None and delay == pytest.approx(0.03)


def test_health_is_told_at_most_once_a_second() -> None:
    assert health_due(now=10.0, healthy_at=0.0)
    assert not health_due(now=10.5, healthy_at=10.0)
    assert health_due(now=11.0, healthy_at=10.0)


# ------------------------------------------------------------------ a sync


@pytest.mark.parametrize(
    ("kind", "state", "on_demand", "known", "skipped"),
    [
        ("sync", "merged", False, True, True),
        ("provision", "merged", True, False, True),
        ("sync", "active", True, False, True),
        ("provision", "active", True, False, False),
        ("sync", "active", True, True, False),
        ("sync", "deleted", False, False, False),
    ],
)
def test_a_sync_skips_merged_entities_and_split_offs_held_back(
    kind: str, state: str, on_demand: bool, known: bool, skipped: bool
) -> None:
    assert (
        sync_skipped(kind=kind, state=state, provision_on_demand=on_demand, known_here=known)
        is skipped
    )


def test_the_scope_filter_applies_to_users_and_references_of_unknown_type() -> None:
    named: dict[str, str | None] = {"u1": "User", "g1": "Group", "x": None, "u2": "User"}
    assert users_to_scope(named) == ["u1", "x", "u2"]
    assert in_scope(named, {"u2"}) == {"g1": "Group", "u2": "User"}


def test_references_are_held_waiting_or_never_tried() -> None:
    rows = [
        {"internal_id": "a", "target": "a", "external_id": "pa", "waiting": False, "tried": True},
        {"internal_id": "b", "target": "b", "external_id": None, "waiting": True, "tried": False},
        {"internal_id": "c", "target": "s", "external_id": None, "waiting": False, "tried": False},
        {"internal_id": "d", "target": "d", "external_id": None, "waiting": False, "tried": True},
    ]
    refs = sort_references(rows)
    assert refs.views == {"a": "pa"}
    assert refs.waiting == ["b"]
    assert [r["internal_id"] for r in refs.untried] == ["c"]
    assert refs.pending == 2, "d was tried and not created: left out, not waited for"


@pytest.mark.parametrize(
    ("stale", "recorded", "drop", "resync"),
    [(False, True, False, False), (True, True, False, True), (False, False, True, True)],
)
def test_a_copy_changed_on_the_writes_way_is_dropped_and_the_entity_synced_again(
    stale: bool, recorded: bool, drop: bool, resync: bool
) -> None:
    assert copy_outcome(stale=stale, recorded=recorded) == (drop, resync)


# ------------------------------------------------------------------ a create


def test_a_201_with_an_id_is_created() -> None:
    answer = create_answer(201, {"id": "p-1"}, on_conflict="fail", resource_type="User")
    assert answer == Created("p-1")


def test_a_201_without_an_id_is_refused_as_such() -> None:
    answer = create_answer(201, {"userName": "x"}, on_conflict="link", resource_type="User")
    assert answer == Refused(no_id=True)


@pytest.mark.parametrize("resource_type", ["User", "Group"])
def test_a_409_links_by_the_unique_attribute_only_when_the_domain_links(
    resource_type: str,
) -> None:
    key = {"User": "userName", "Group": "displayName"}[resource_type]
    assert create_answer(409, None, on_conflict="link", resource_type=resource_type) == Link(key)
    assert create_answer(409, None, on_conflict="fail", resource_type=resource_type) == Refused()


def test_a_409_of_a_type_without_a_unique_attribute_is_refused() -> None:
    assert create_answer(409, {}, on_conflict="link", resource_type="Device") == Refused()


@pytest.mark.parametrize("status", [200, 400, 500, 503])
def test_any_other_answer_is_refused(status: int) -> None:
    assert create_answer(status, {"id": "x"}, on_conflict="link", resource_type="User") == Refused()


def test_a_create_links_only_to_a_single_match() -> None:
    assert link_target(["p-1"]) == "p-1"
    assert link_target([]) is None
    assert link_target(["p-1", "p-2"]) is None


def _conflict() -> Failure:
    return Failure(Verdict.PERMANENT, "POST /Users: HTTP 409", status=409)


def test_a_first_409_is_retried_and_its_time_kept() -> None:
    failure = patient(_conflict(), conflict_since=None, now=1000.0, patience=300)
    assert failure.verdict is Verdict.TRANSIENT and not failure.peer_fault
    assert failure.conflict_since == 1000.0
    assert "retried for 300 s first" in failure.reason


def test_a_409_is_patient_from_the_first_refusal_not_the_latest() -> None:
    still = patient(_conflict(), conflict_since=1000.0, now=1299.0, patience=300)
    assert still.verdict is Verdict.TRANSIENT and still.conflict_since == 1000.0
    over = patient(_conflict(), conflict_since=1000.0, now=1300.0, patience=300)
    assert over.verdict is Verdict.PERMANENT and over.peer_fault
    assert over.conflict_since == 1000.0, "kept: the dead letter says since when"


def test_patience_leaves_other_failures_and_the_given_one_alone() -> None:
    other = Failure(Verdict.PERMANENT, "HTTP 400", status=400)
    assert patient(other, conflict_since=None, now=1.0, patience=300) is other
    conflict = _conflict()
    patient(conflict, conflict_since=None, now=1.0, patience=300)
    assert conflict.verdict is Verdict.PERMANENT and conflict.conflict_since is None


def test_a_value_is_parked_aside_by_the_holders_prefix() -> None:
    assert unique_value("User", {"userName": "alice"}) == ("userName", "alice")
    assert unique_value("User", {"userName": 3}) is None
    assert unique_value("Device", {"userName": "alice"}) is None
    assert park("userName", "alice", "0123456789abcdef") == {
        "schemas": [PATCH_SCHEMA],
        "Operations": [{"op": "replace", "path": "userName", "value": "alice~01234567"}],
    }


# ------------------------------------------------------------------ an update


def test_a_peer_holding_what_home_holds_gets_no_write() -> None:
    doc = {"schemas": [CORE_USER], "userName": "alice"}
    assert plan_update(doc, copy.deepcopy(doc), suspended=False, write_only={}) is None


def test_a_suspended_account_is_reactivated_even_when_nothing_else_changed() -> None:
    doc = {"schemas": [CORE_USER], "userName": "alice"}
    plan = plan_update(doc, dict(doc), suspended=True, write_only={})
    assert plan is not None
    assert plan.patch == [{"op": "replace", "path": "active", "value": True}]


def test_home_saying_active_is_not_overridden_by_the_reactivation() -> None:
    before = {"schemas": [CORE_USER], "userName": "alice", "active": False}
    after = {"schemas": [CORE_USER], "userName": "alice", "active": False}
    plan = plan_update(before, after, suspended=True, write_only={})
    assert plan is not None and plan.patch == []


def test_write_only_values_ride_on_the_patch_and_the_put() -> None:
    doc = {"schemas": [CORE_USER], "userName": "alice"}
    plan = plan_update(doc, dict(doc), suspended=False, write_only={"password": "s3cret"})
    assert plan is not None
    assert plan.patch == [{"op": "replace", "path": "password", "value": "s3cret"}]
    assert plan.put == {**doc, "password": "s3cret"}


def test_without_a_copy_the_update_is_a_put() -> None:
    doc = {"schemas": [CORE_USER], "userName": "alice"}
    plan = plan_update(None, doc, suspended=False, write_only={})
    assert plan is not None and plan.patch is None and plan.put == doc


# ------------------------------------------------------------------ a deprovision


def _step(**overrides: Any) -> Any:
    args: dict[str, Any] = {
        "external_id": "p-1",
        "endpoint_known": True,
        "mapping_state": "active",
        "policy": "delete",
        "suspended_at": None,
        "suspend_for": timedelta(hours=1),
        "now": T0,
    }
    return deprovision_step(**{**args, **overrides})


def test_a_deleting_peer_has_the_account_deleted() -> None:
    assert _step() == Delete()


def test_a_suspending_peer_has_the_account_suspended_then_deleted_after_suspend_for() -> None:
    assert _step(policy="suspend") == Suspend(T0, T0 + timedelta(hours=1))
    suspended = {"policy": "suspend", "suspended_at": T0}
    assert _step(**suspended, now=T0 + timedelta(minutes=59)) == WaitSuspended(
        T0 + timedelta(hours=1)
    )
    assert _step(**suspended, now=T0 + timedelta(hours=1)) == Delete()


def test_without_an_account_only_the_pending_row_goes() -> None:
    assert _step(external_id=None, mapping_state=None) == DropPending(undo=False)
    assert _step(external_id=None, mapping_state="pending_create") == DropPending(undo=True)
    assert _step(
        external_id=None, mapping_state="pending_create", endpoint_known=False
    ) == DropPending(undo=False)
    assert _step(endpoint_known=False, policy="suspend") == DropPending(undo=False)


# ------------------------------------------------------------------ a merge's clean-up


def test_a_membership_move_removes_the_alias_and_adds_the_primary_once() -> None:
    ops = membership_move([{"value": "alias"}, {"value": "x"}], "alias", "prim")
    assert ops == [
        {"op": "remove", "path": 'members[value eq "alias"]'},
        {"op": "add", "path": "members", "value": [{"value": "prim"}]},
    ]
    assert membership_move([{"value": "alias"}, {"value": "prim"}], "alias", "prim") == [
        {"op": "remove", "path": 'members[value eq "alias"]'}
    ]


def test_a_group_that_no_longer_names_the_alias_is_left_alone() -> None:
    assert membership_move([{"value": "x"}, "garbage"], "alias", "prim") is None
    assert membership_move(None, "alias", "prim") is None


def test_an_alias_with_a_quote_is_escaped_in_the_remove_filter() -> None:
    ops = membership_move([{"value": 'a"b'}], 'a"b', "prim")
    assert ops is not None and ops[0]["path"] == 'members[value eq "a\\"b"]'


def test_the_copy_follows_the_move_and_the_original_is_unchanged() -> None:
    document = {"displayName": "g", "members": [{"value": "alias"}, {"value": "x"}]}
    moved = follow_move(document, "alias", "prim")
    assert moved["members"] == [{"value": "x"}, {"value": "prim"}]
    assert document["members"] == [{"value": "alias"}, {"value": "x"}]
    again = follow_move({"members": [{"value": "alias"}, {"value": "prim"}]}, "alias", "prim")
    assert again["members"] == [{"value": "prim"}]


# ------------------------------------------------------------------ a pushed SET


@pytest.mark.parametrize("status", [200, 202, 204])
def test_a_set_answered_2xx_is_delivered(status: int) -> None:
    assert set_answer(status, None) is True


def test_a_400_with_an_error_code_is_the_receivers_refusal() -> None:
    assert set_answer(400, {"err": "invalid_key", "description": "no such key"}) == SetRefused(
        {"err": "invalid_key", "description": "no such key"}
    )
    assert set_answer(400, {"err": "jwtParse"}) == SetRefused(
        {"err": "jwtParse", "description": None}
    )


@pytest.mark.parametrize(
    ("status", "body"), [(400, {"err": 3}), (400, None), (400, ["err"]), (401, {"err": "x"})]
)
def test_any_other_answer_to_a_set_is_judged_as_a_peers(status: int, body: Any) -> None:
    assert set_answer(status, body) is False


def test_no_answer_is_retried_and_says_who_did_not_answer() -> None:
    failure = unanswered("POST /Users", TimeoutError())
    assert failure.verdict is Verdict.TRANSIENT
    assert failure.reason == (
        "POST /Users: the peer did not answer (TimeoutError); retrying until it does"
    )
    pushed = unanswered("SET abc", ConnectionResetError(), by="the receiver")
    assert pushed.verdict is Verdict.TRANSIENT
    assert "the receiver did not answer (ConnectionResetError)" in pushed.reason
