"""The merge and split rules against a second, naive implementation (``tests/model.py``) over
random sequences across three domains: the same table, the same peer tasks, the same
cancellations and the same refusals after every step.

``pytest --hypothesis-show-statistics tests/test_rules_properties.py`` shows how many operations
were refused and how many alias clean-ups completed.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from broker.mapping.rules import (
    MappingRow,
    MappingState,
    PeerTask,
    Plan,
    RuleError,
    TaskKind,
    apply_plan,
    plan_merge,
    plan_split,
)
from tests.model import (
    PUSH_DOMAINS,
    AckDelete,
    Delete,
    Delivery,
    Federation,
    Merge,
    Provision,
    Refused,
    Split,
    check_invariants,
    external_names,
    operations,
)


def _table(rows: list[MappingRow]) -> set[tuple[str, str, str | None, bool, str]]:
    return {(r.internal_id, r.domain, r.external_id, r.primary, r.state.value) for r in rows}


def _plan(op: Merge | Split, rows: list[MappingRow]) -> Plan:
    if isinstance(op, Merge):
        involved = [op.survivor, *op.losers]
        mine = [r for r in rows if r.internal_id in involved]
        return plan_merge(op.survivor, op.losers, mine, push_domains=PUSH_DOMAINS)
    moves = {new: list(refs) for new, refs in op.moves}
    mine = [r for r in rows if r.internal_id in (op.source, *moves)]
    return plan_split(op.source, moves, mine, push_domains=PUSH_DOMAINS, provision=op.provision)


def _cancels(task: PeerTask, delivery: Delivery) -> bool:
    """Whether the store's ``cancel_tasks`` cancels ``delivery`` (pending) for ``task``."""
    if task.domain != delivery.domain:
        return False
    if task.kind is TaskKind.CANCEL_CREATE:
        return delivery.kind == "provision" and delivery.internal_id == task.internal_id
    return (
        delivery.kind in ("move_memberships", "delete_alias")
        and delivery.external_id == task.external_id
    )


def _ack(rows: list[MappingRow], op: AckDelete, alias: str | None) -> list[MappingRow]:
    """What the worker's ``retire_alias`` does to the rules' table."""
    kept = []
    for r in rows:
        if (r.domain, r.external_id, r.state) == (op.domain, alias, MappingState.DELETION_REQUIRED):
            if op.retain:
                kept.append(
                    MappingRow(
                        r.internal_id,
                        r.domain,
                        r.external_id,
                        False,
                        MappingState.RETIRED,
                        r.origin,
                    )
                )
            continue
        kept.append(r)
    return kept


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_rules_and_the_naive_model_agree_on_random_sequences(data: st.DataObject) -> None:
    fed = Federation()
    rows: list[MappingRow] = []  # the table as the rules leave it
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        op = data.draw(operations(fed), label="op")
        if isinstance(op, Provision):
            new = fed.provision(op)
            if new is not None:
                rows.append(new.frozen())
        elif isinstance(op, AckDelete):
            done = fed.ack_delete(op)
            assert done is not None, "the generator acknowledges only deletes that are pending"
            rows = _ack(rows, op, done.external_id)
            event("alias clean-up completed")
        elif isinstance(op, Delete):
            fed.delete(op)
        else:
            rows = _step(fed, rows, op)
        assert _table(rows) == fed.table()
        check_invariants(fed)


def _step(fed: Federation, rows: list[MappingRow], op: Merge | Split) -> list[MappingRow]:
    """``op`` through the model and the rules: the same refusal, or the same plan; the rules'
    table after it."""
    kind = type(op).__name__.lower()
    names = external_names(fed.rows)
    prior = [d.state for d in fed.deliveries]
    try:
        applied = fed.merge(op) if isinstance(op, Merge) else fed.split(op)
    except Refused as refused:
        event(f"{kind} refused {refused.status}")
        if refused.rule:  # the rules refuse it too (the rest are the store's refusals)
            try:
                _plan(op, rows)
            except RuleError as error:
                assert error.status == refused.status
            else:
                raise AssertionError(f"the rules accept {op}; the model: {refused}") from None
        return rows
    if not applied:
        event(f"{kind} replayed")
        return rows
    event(f"{kind} done")
    plan = _plan(op, rows)
    # The same peer tasks, in the same order...
    new = fed.deliveries[len(prior) :]
    assert [
        (t.kind.value, t.domain, t.internal_id, t.external_id, t.target_external_id)
        for t in plan.deliveries
    ] == [d.task() for d in new]
    # ...the same pending deliveries cancelled...
    prior += ["pending"] * len(new)
    expected = [
        "cancelled" if state == "pending" and any(_cancels(t, d) for t in plan.cancels) else state
        for d, state in zip(fed.deliveries, prior, strict=True)
    ]
    assert [d.state for d in fed.deliveries] == expected
    # ...and no external ID lost or invented.
    assert external_names(fed.rows) == names
    if isinstance(op, Merge):
        assert plan.merged == dict.fromkeys(op.losers, op.survivor)
    return apply_plan(rows, plan)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_a_merge_after_a_split_with_the_same_rows_restores_the_table(data: st.DataObject) -> None:
    """Undoing: split N off S moving rows, then merge N back into S, leaves every name on S."""
    fed = Federation()
    for _ in range(data.draw(st.integers(0, 12))):
        op = data.draw(operations(fed))
        if isinstance(op, Provision):
            fed.provision(op)
    rows = fed.mapping_rows()
    source = data.draw(st.sampled_from(fed.live()))
    refs = [(r.domain, r.external_id) for r in rows if r.internal_id == source and r.external_id]
    before = {external for _, external in refs}
    moved = data.draw(st.lists(st.sampled_from(refs), unique=True)) if refs else []
    new = fed.new_entity()
    mine = [r for r in rows if r.internal_id == source]
    rows = apply_plan(rows, plan_split(source, {new: moved}, mine))  # type: ignore[dict-item]
    mine = [r for r in rows if r.internal_id in (source, new)]
    rows = apply_plan(rows, plan_merge(source, [new], mine))
    assert {r.external_id for r in rows if r.internal_id == source and r.external_id} == before
    assert not [r for r in rows if r.internal_id == new]
