-- Named queries of domain bearer tokens (broker/tokens.py). Only hashes are stored.

-- name: insert_token
INSERT INTO domain_tokens (domain_id, token_hash, prefix, scopes, expires_at)
VALUES ($1, $2, $3, $4, $5)
RETURNING id, domain_id, prefix, scopes, expires_at, revoked_at, last_used_at, created_at

-- name: token_by_hash
SELECT t.id, t.domain_id, t.scopes, t.expires_at, t.revoked_at, d.status AS domain_status,
       d.kind AS domain_kind
FROM domain_tokens t
JOIN domains d ON d.id = t.domain_id
WHERE t.token_hash = $1

-- name: touch_token
UPDATE domain_tokens SET last_used_at = now() WHERE id = $1

-- name: list_tokens
SELECT id, domain_id, prefix, scopes, expires_at, revoked_at, last_used_at, created_at
FROM domain_tokens
WHERE $1::text IS NULL OR domain_id = $1
ORDER BY domain_id, created_at, id

-- name: revoke_token
UPDATE domain_tokens SET revoked_at = now()
WHERE id = $1 AND revoked_at IS NULL
RETURNING id, domain_id, prefix, scopes, expires_at, revoked_at, last_used_at, created_at

-- name: domain_kind
-- A domain that can hold tokens (not one removed with its mappings kept).
SELECT kind FROM domains WHERE id = $1 AND status <> 'removed'
