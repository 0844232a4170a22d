-- 0009: finished deliveries are purged after [propagation] done_retention, so the outbox does not
-- grow for ever; the purge finds them by age without reading the rest of the table.
CREATE INDEX outbox_finished ON outbox (updated_at) WHERE state IN ('done', 'cancelled');
