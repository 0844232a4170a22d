"""Property tests of the merge and split rules over random sequences across three domains."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.mapping.rules import MappingState, RuleError
from tests.model import (
    AckDelete,
    Federation,
    Merge,
    Provision,
    Split,
    check_invariants,
    external_names,
    operations,
    outstanding_deletes,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_merges_and_splits_keep_the_mapping_table_sound(data: st.DataObject) -> None:
    fed = Federation()
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        op = data.draw(operations(fed), label="op")
        before = external_names(fed.rows)
        if isinstance(op, Provision):
            fed.provision(op)
        elif isinstance(op, AckDelete):
            fed.ack_delete(op)
        else:
            try:
                fed.merge(op) if isinstance(op, Merge) else fed.split(op)
            except RuleError:
                continue
            # A merge or a split loses no external ID and invents none.
            assert external_names(fed.rows) == before
        check_invariants(fed)
        outstanding = outstanding_deletes(fed.tasks)
        for row in fed.rows:
            name = (row.domain, row.external_id)
            if row.state is MappingState.DELETION_REQUIRED:
                assert name in outstanding, f"{row} waits for a delete nobody asked for"
            if row.primary:
                assert name not in outstanding, f"a peer is asked to delete primary {row}"


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_a_merge_after_a_split_with_the_same_rows_restores_the_table(data: st.DataObject) -> None:
    """Undoing: split N off S moving rows, then merge N back into S, leaves every name on S."""
    fed = Federation()
    for _ in range(data.draw(st.integers(0, 12))):
        op = data.draw(operations(fed))
        if isinstance(op, Provision):
            fed.provision(op)
    source = data.draw(st.sampled_from(fed.live()))
    before = {r.external_id for r in fed.rows_of(source) if r.external_id is not None}
    refs = [(r.domain, r.external_id) for r in fed.rows_of(source) if r.external_id is not None]
    moved = data.draw(st.lists(st.sampled_from(refs), unique=True)) if refs else []
    new = fed.new_entity()
    fed.split(Split(source, ((new, tuple(moved)),), "s"))  # type: ignore[arg-type]
    fed.merge(Merge(source, (new,), "m"))
    check_invariants(fed)
    assert {r.external_id for r in fed.rows_of(source) if r.external_id is not None} == before
