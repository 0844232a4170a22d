-- 0019: outbox_ready (0001) is read by no statement since the claim walks outbox_claim_order
-- (0007): it only cost an entry on every enqueue and every claim (issue 15, the cost of a
-- delivery).
DROP INDEX IF EXISTS outbox_ready;
