-- 0007: claiming stays fast however long the queue and however many rows are done.

-- The claim looks for each peer's unfinished rows in id order, and for older unfinished rows of
-- the same entity; done rows (kept) must not be read on the way.
CREATE INDEX outbox_claim_order ON outbox (domain_id, id) WHERE state IN ('pending', 'in_flight');
