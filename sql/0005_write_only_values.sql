-- 0005: write-only attribute values (returned "never", such as password) travel with a sync.

-- A password set through the broker cannot be read back from home: it is delivered from the
-- write itself. The values are sealed with AES-256-GCM under a key kept outside the database
-- (broker/propagation/secrets.py), and erased once the delivery is done or discarded.
ALTER TABLE outbox ADD COLUMN sealed_values bytea;
