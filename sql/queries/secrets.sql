-- Named queries of the sealing and signing key (broker/secrets.py).

-- name: claim_key_fingerprint
-- The key's fingerprint, recorded by the first process; the one recorded, for every other.
WITH added AS (
    INSERT INTO broker_key (fingerprint) VALUES ($1)
    ON CONFLICT (one) DO NOTHING
    RETURNING fingerprint
)
SELECT fingerprint FROM added
UNION ALL
SELECT fingerprint FROM broker_key
LIMIT 1

-- name: key_fingerprint
SELECT fingerprint FROM broker_key
