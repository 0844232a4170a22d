-- 0023: a reconciliation takes its actions in order without sorting what is left of the run.
--
-- actionable_items reads a run's next 500 actions not yet taken, users before groups, in the
-- order they were found. Without an index in that order each batch sorted every undone item of
-- the run (46 ms a batch at 100,000 accounts, docs/scaling.md); this one hands them over in
-- order, and an item taken (done) leaves it.
CREATE INDEX reconciliation_items_actionable
    ON reconciliation_items (run_id, (resource_type <> 'User'), seq)
    WHERE NOT done AND action <> 'report';
