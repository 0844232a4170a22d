"""The merge and split rules on seed 002's tables and the hard cases, with no I/O."""

from __future__ import annotations

import pytest

from broker.mapping.rules import (
    CopyDropped,
    Handover,
    IdentityNotice,
    MappingRow,
    MappingState,
    Origin,
    PeerTask,
    RuleError,
    TaskKind,
    apply_plan,
    plan_merge,
    plan_split,
)

ACTIVE = MappingState.ACTIVE
PENDING = MappingState.PENDING_CREATE
DELETION = MappingState.DELETION_REQUIRED
RETIRED = MappingState.RETIRED


def row(
    internal: str,
    domain: str,
    external: str | None,
    primary: bool = True,
    state: MappingState = ACTIVE,
    origin: Origin = Origin.PEER,
) -> MappingRow:
    if external is None:
        state = PENDING
    return MappingRow(internal, domain, external, primary, state, origin)


def of(rows: list[MappingRow], *entities: str) -> list[MappingRow]:
    return [r for r in rows if r.internal_id in entities]


def table(rows: list[MappingRow]) -> set[tuple[str, str, str | None, bool, str]]:
    """The mapping table as seed 002 draws it (plus the state column of DESIGN section 2)."""
    return {(r.internal_id, r.domain, r.external_id, r.primary, r.state.value) for r in rows}


# ---------------------------------------------------------------- seed 002, false positive


def test_seed_false_positive_split_is_invisible_to_domain_2_until_provisioned() -> None:
    # Domain 1 provisioned John Smith into Domain 2, which returned ff487230b3a0.
    before = [row("9caf78aac3d6", "D2", "ff487230b3a0")]
    assert table(before) == {("9caf78aac3d6", "D2", "ff487230b3a0", True, "active")}

    # The false positive is found: a99a5feba839 is created in home and split off.
    plan = plan_split("9caf78aac3d6", {"a99a5feba839": []}, before)
    after = apply_plan(before, plan)
    # The mapping table is unchanged and Domain 2 is told nothing: the new entity is invisible.
    assert table(after) == table(before)
    assert plan.tasks == ()

    # "At some convenient time" Domain 2 is asked to provision it, eagerly in this policy.
    eager = plan_split(
        "9caf78aac3d6", {"a99a5feba839": []}, before, push_domains={"D2"}, provision="eager"
    )
    assert eager.tasks == (PeerTask(TaskKind.PROVISION, "D2", "a99a5feba839"),)
    assert eager.changes == ()
    # Domain 2 answers 7a87f27c1dd8, which goes in as the new entity's primary: seed's end state.
    provisioned = [*after, row("a99a5feba839", "D2", "7a87f27c1dd8")]
    assert table(provisioned) == {
        ("9caf78aac3d6", "D2", "ff487230b3a0", True, "active"),
        ("a99a5feba839", "D2", "7a87f27c1dd8", True, "active"),
    }


# ---------------------------------------------------------------- seed 002, false negative


def test_seed_false_negative_merge_keeps_both_ids_and_deletes_the_non_primary_later() -> None:
    before = [
        row("9caf78aac3d6", "D2", "ff487230b3a0"),
        row("273d36e30d09", "D2", "41206cc97c8b"),
    ]
    plan = plan_merge("9caf78aac3d6", ["273d36e30d09"], before)
    after = apply_plan(before, plan)
    # The seed's table after the merge: both external IDs resolve to the survivor; one primary.
    assert table(after) == {
        ("9caf78aac3d6", "D2", "ff487230b3a0", True, "active"),
        ("9caf78aac3d6", "D2", "41206cc97c8b", False, "deletion_required"),
    }
    assert plan.merged == {"273d36e30d09": "9caf78aac3d6"}
    # Domain 2 is asked, not in lock-step, to move memberships and then delete the non-primary;
    # nothing else reaches it.
    assert plan.tasks == (
        PeerTask(TaskKind.MOVE_MEMBERSHIPS, "D2", "9caf78aac3d6", "41206cc97c8b", "ff487230b3a0"),
        PeerTask(TaskKind.DELETE_ALIAS, "D2", "9caf78aac3d6", "41206cc97c8b"),
    )


def test_merge_where_only_the_loser_is_mapped_moves_its_row_and_keeps_it_primary() -> None:
    before = [row("S", "D1", "s1"), row("L", "D2", "l2")]
    plan = plan_merge("S", ["L"], before)
    assert table(apply_plan(before, plan)) == {
        ("S", "D1", "s1", True, "active"),
        ("S", "D2", "l2", True, "active"),
    }
    assert plan.tasks == ()  # the peer keeps its account: no delete


def test_merge_where_only_the_survivor_is_mapped_changes_nothing_there() -> None:
    before = [row("S", "D1", "s1")]
    plan = plan_merge("S", ["L"], before)
    assert plan.changes == () and plan.tasks == ()
    assert plan.merged == {"L": "S"}


def test_three_way_merge_applies_the_rule_to_each_loser() -> None:
    before = [
        row("S", "D1", "s1"),
        row("L1", "D1", "a1"),
        row("L1", "D2", "a2"),
        row("L2", "D2", "b2"),
        row("L2", "D3", "b3"),
    ]
    plan = plan_merge("S", ["L1", "L2"], before)
    assert table(apply_plan(before, plan)) == {
        ("S", "D1", "s1", True, "active"),
        ("S", "D1", "a1", False, "deletion_required"),
        ("S", "D2", "a2", True, "active"),  # L1's row: S had none in D2
        ("S", "D2", "b2", False, "deletion_required"),  # L2's: S has L1's by now
        ("S", "D3", "b3", True, "active"),
    }
    deletes = [(t.domain, t.external_id) for t in plan.tasks if t.kind is TaskKind.DELETE_ALIAS]
    assert deletes == [("D1", "a1"), ("D2", "b2")]
    moves = [
        (t.external_id, t.target_external_id)
        for t in plan.tasks
        if t.kind is TaskKind.MOVE_MEMBERSHIPS
    ]
    assert moves == [("a1", "s1"), ("b2", "a2")]


def test_merge_chain_a_into_b_then_b_into_c() -> None:
    rows = [row("A", "D2", "a"), row("B", "D2", "b"), row("C", "D2", "c"), row("A", "D3", "a3")]
    rows = apply_plan(rows, plan_merge("B", ["A"], of(rows, "A", "B")))
    rows = apply_plan(rows, plan_merge("C", ["B"], of(rows, "B", "C")))
    assert table(rows) == {
        ("C", "D2", "c", True, "active"),
        ("C", "D2", "b", False, "deletion_required"),
        ("C", "D2", "a", False, "deletion_required"),  # A's alias moved on unchanged
        ("C", "D3", "a3", True, "active"),
    }


def test_merge_undone_by_a_split_that_moves_the_alias_back() -> None:
    rows = [row("S", "D2", "ff487230b3a0"), row("L", "D2", "41206cc97c8b")]
    rows = apply_plan(rows, plan_merge("S", ["L"], rows))
    # The merge was itself a false positive: N is created in home and gets L's old account back.
    plan = plan_split("S", {"N": [("D2", "41206cc97c8b")]}, rows)
    rows = apply_plan(rows, plan)
    assert table(rows) == {
        ("S", "D2", "ff487230b3a0", True, "active"),
        ("N", "D2", "41206cc97c8b", True, "active"),
    }
    # The pending delete is cancelled and nothing is deleted.
    assert plan.tasks == (PeerTask(TaskKind.CANCEL_DELETE, "D2", "N", "41206cc97c8b"),)


def test_three_way_split_gives_each_new_entity_its_old_account_back() -> None:
    rows = [row("S", "D2", "s"), row("X", "D2", "x"), row("Y", "D2", "y"), row("Y", "D1", "y1")]
    rows = apply_plan(rows, plan_merge("S", ["X", "Y"], rows))
    plan = plan_split("S", {"N1": [("D2", "x")], "N2": [("D2", "y"), ("D1", "y1")]}, rows)
    rows = apply_plan(rows, plan)
    assert table(rows) == {
        ("S", "D2", "s", True, "active"),
        ("N1", "D2", "x", True, "active"),
        ("N2", "D2", "y", True, "active"),
        ("N2", "D1", "y1", True, "active"),
    }
    assert {t.kind for t in plan.tasks} == {TaskKind.CANCEL_DELETE}


def test_split_moving_the_primary_revives_the_sources_alias() -> None:
    rows = apply_plan(
        [row("S", "D2", "s"), row("L", "D2", "l")],
        plan_merge("S", ["L"], [row("S", "D2", "s"), row("L", "D2", "l")]),
    )
    plan = plan_split("S", {"N": [("D2", "s")]}, rows)
    assert table(apply_plan(rows, plan)) == {
        ("N", "D2", "s", True, "active"),
        ("S", "D2", "l", True, "active"),
    }
    assert plan.tasks == (PeerTask(TaskKind.CANCEL_DELETE, "D2", "S", "l"),)


def test_split_moving_the_primary_and_an_alias_to_one_entity_keeps_the_primary() -> None:
    rows = [row("S", "D2", "s"), row("S", "D2", "l", primary=False, state=DELETION)]
    plan = plan_split("S", {"N": [("D2", "l"), ("D2", "s")]}, rows)
    assert table(apply_plan(rows, plan)) == {
        ("N", "D2", "s", True, "active"),
        ("N", "D2", "l", False, "deletion_required"),  # its delete goes on
    }
    assert plan.tasks == ()


def test_eager_split_provisions_only_into_push_domains_that_knew_the_source() -> None:
    rows = [row("S", "D2", "s"), row("S", "D1", "m", origin=Origin.MINTED)]
    plan = plan_split("S", {"N": []}, rows, push_domains={"D2", "D3"}, provision="eager")
    assert plan.tasks == (PeerTask(TaskKind.PROVISION, "D2", "N"),)


# ---------------------------------------------------------------- pending creates, minted IDs


def test_merging_a_loser_whose_create_is_pending_cancels_the_create() -> None:
    rows = [row("S", "D2", "s"), row("L", "D2", None)]
    plan = plan_merge("S", ["L"], rows)
    assert table(apply_plan(rows, plan)) == {("S", "D2", "s", True, "active")}
    assert plan.tasks == (PeerTask(TaskKind.CANCEL_CREATE, "D2", "L"),)


def test_merging_into_a_survivor_whose_create_is_pending_keeps_the_existing_account() -> None:
    rows = [row("S", "D2", None), row("L", "D2", "l")]
    plan = plan_merge("S", ["L"], rows)
    assert table(apply_plan(rows, plan)) == {("S", "D2", "l", True, "active")}
    assert plan.tasks == (PeerTask(TaskKind.CANCEL_CREATE, "D2", "S"),)


def test_pending_create_of_a_loser_moves_to_a_survivor_with_no_row() -> None:
    rows = [row("L", "D2", None)]
    plan = plan_merge("S", ["L"], rows)
    assert table(apply_plan(rows, plan)) == {("S", "D2", None, True, "pending_create")}
    assert plan.tasks == ()


def test_second_pending_loser_after_a_moved_pending_row_is_cancelled() -> None:
    rows = [row("L1", "D2", None), row("L2", "D2", "l2")]
    plan = plan_merge("S", ["L1", "L2"], rows)
    # L1's pending create moved to S first, then L2's real account replaced it.
    assert table(apply_plan(rows, plan)) == {("S", "D2", "l2", True, "active")}
    assert plan.tasks == (PeerTask(TaskKind.CANCEL_CREATE, "D2", "S"),)


def test_minted_aliases_are_retired_at_once_with_nothing_sent() -> None:
    rows = [row("S", "D1", "m1", origin=Origin.MINTED), row("L", "D1", "m2", origin=Origin.MINTED)]
    plan = plan_merge("S", ["L"], rows)
    assert table(apply_plan(rows, plan)) == {
        ("S", "D1", "m1", True, "active"),
        ("S", "D1", "m2", False, "retired"),
    }
    assert plan.tasks == ()


def test_a_retired_minted_alias_moved_by_a_split_becomes_primary_again() -> None:
    rows = [
        row("S", "D1", "m1", origin=Origin.MINTED),
        row("S", "D1", "m2", False, RETIRED, Origin.MINTED),
    ]
    plan = plan_split("S", {"N": [("D1", "m2")]}, rows)
    assert ("N", "D1", "m2", True, "active") in table(apply_plan(rows, plan))


def test_a_retired_peer_alias_moved_by_a_split_stays_an_alias() -> None:
    # The peer deleted that account already: it can resolve late references, not be primary.
    rows = [row("S", "D2", "s"), row("S", "D2", "gone", False, RETIRED)]
    plan = plan_split("S", {"N": [("D2", "gone")]}, rows, push_domains={"D2"}, provision="eager")
    assert ("N", "D2", "gone", False, "retired") in table(apply_plan(rows, plan))
    assert plan.tasks == (PeerTask(TaskKind.PROVISION, "D2", "N"),)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("survivor", "losers", "message"),
    [
        ("S", [], "at least one"),
        ("S", ["S"], "both sides"),
        ("S", ["L", "L"], "named twice"),
    ],
)
def test_merge_refuses_malformed_requests(survivor: str, losers: list[str], message: str) -> None:
    with pytest.raises(RuleError, match=message):
        plan_merge(survivor, losers, [])


def test_split_refuses_to_move_a_row_the_source_does_not_have() -> None:
    rows = [row("S", "D2", "s"), row("T", "D2", "t")]
    with pytest.raises(RuleError, match="D2:t is not mapped to S"):
        plan_split("S", {"N": [("D2", "t")]}, [rows[0]])


def test_split_refuses_to_move_one_row_twice() -> None:
    rows = [row("S", "D2", "s")]
    with pytest.raises(RuleError, match="moved twice"):
        plan_split("S", {"N1": [("D2", "s")], "N2": [("D2", "s")]}, rows)


def test_rule_errors_carry_a_scim_status_and_type() -> None:
    with pytest.raises(RuleError) as caught:
        plan_merge("S", ["S"], [])
    assert caught.value.status == 400
    assert caught.value.scim_type == "invalidValue"


# ---------------------------------------------------------------- the rest of the plan


def test_seed_merge_plans_the_copy_drop_group_resync_and_notice_and_no_handover() -> None:
    before = [
        row("9caf78aac3d6", "D2", "ff487230b3a0"),
        row("273d36e30d09", "D2", "41206cc97c8b"),
    ]
    plan = plan_merge("9caf78aac3d6", ["273d36e30d09"], before, push_domains={"D2"})
    # The alias leaves the survivor's own account and what it last received as they are.
    assert plan.copies_dropped == (CopyDropped("D2", "273d36e30d09", "273d36e30d09"),)
    # The survivor keeps its account; the loser is merged, so nothing is created anew.
    assert plan.handovers == ()
    # The broker's groups naming the alias there are synced again, to name the survivor.
    assert plan.regroup == (("D2", "41206cc97c8b"),)
    assert plan.notices == (
        IdentityNotice("merge", "D2", "41206cc97c8b", "9caf78aac3d6", "ff487230b3a0"),
    )
    assert plan.undo_creates == () and plan.syncs == () and plan.hold_back == {}


def test_an_account_that_changes_hands_in_a_push_peer_is_handed_over_and_nowhere_else() -> None:
    rows = [row("S", "D1", "s1"), row("L", "D2", "l2"), row("L", "D3", "l3")]
    plan = plan_merge("S", ["L"], rows, push_domains={"D2"})
    # Both rows move to S as primaries: S's copy goes and S's state is synced, after L's work.
    assert set(plan.copies_dropped) == {CopyDropped("D2", "L", "S"), CopyDropped("D3", "L", "S")}
    assert plan.handovers == (Handover("D2", "S", "L"),)  # D3 is not a push peer
    assert plan.regroup == (("D2", "l2"), ("D3", "l3"))
    assert {n.external_id: n.primary for n in plan.notices} == {"l2": "l2", "l3": "l3"}


def test_a_cancelled_pending_create_of_a_push_peer_is_undone() -> None:
    rows = [row("S", "D2", "s"), row("L", "D2", None), row("L", "D3", None)]
    plan = plan_merge("S", ["L"], rows, push_domains={"D2"})
    assert plan.undo_creates == (rows[1],)
    assert plan.notices == ()  # a pending row names no ID a domain knows


def test_split_moving_a_primary_hands_the_account_over_and_creates_the_source_anew() -> None:
    rows = [row("S", "D2", "s")]
    plan = plan_split("S", {"N": [("D2", "s")]}, rows, push_domains={"D2"})
    assert plan.copies_dropped == (CopyDropped("D2", "S", "N"),)
    # N takes the account over (synced to N's state after S's work); S, left without an account
    # in D2, is created anew after N made the account its own.
    assert plan.handovers == (Handover("D2", "N", "S"), Handover("D2", "S", "N"))
    assert plan.regroup == (("D2", "s"),)
    assert plan.notices == (IdentityNotice("split", "D2", "s", "N", "s", None),)
    assert plan.hold_back == {"N": True}


def test_split_reviving_the_sources_alias_hands_it_back_and_creates_nothing() -> None:
    rows = [row("S", "D2", "s"), row("S", "D2", "l", primary=False, state=DELETION)]
    plan = plan_split("S", {"N": [("D2", "s")]}, rows, push_domains={"D2"})
    assert set(plan.handovers) == {Handover("D2", "N", "S"), Handover("D2", "S", "S")}
    assert plan.notices == (IdentityNotice("split", "D2", "s", "N", "s", "l"),)


def test_eager_split_syncs_the_new_entities_to_push_peers_that_never_knew_the_source() -> None:
    rows = [row("S", "D2", "s")]
    plan = plan_split(
        "S", {"N1": [], "N2": []}, rows, push_domains={"D2", "D3", "D4"}, provision="eager"
    )
    assert plan.syncs == (("D3", "N1"), ("D3", "N2"), ("D4", "N1"), ("D4", "N2"))
    assert plan.hold_back == {"N1": False, "N2": False}
    assert [t.kind for t in plan.deliveries] == [TaskKind.PROVISION, TaskKind.PROVISION]
    assert plan.cancels == ()
    lazy = plan_split("S", {"N1": []}, rows, push_domains={"D2", "D3"})
    assert lazy.syncs == () and lazy.hold_back == {"N1": True}
