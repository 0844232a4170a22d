-- Named queries of the operator console (broker/console/): its sessions, and what its pages read.

-- name: console_session_start
-- A session for token $2 (its actor name $3, CSRF token $4), ending at $5.
INSERT INTO console_sessions (id_hash, token_id, actor, csrf, expires_at)
VALUES ($1, $2, $3, $4, $5)

-- name: console_token_prefix
SELECT prefix FROM domain_tokens WHERE id = $1

-- name: console_session
-- A live session: not ended, not expired, and its token neither revoked nor expired, its
-- domain not disabled. The token's scopes as they are now (a scope removed ends what it allowed).
SELECT s.token_id, s.actor, s.csrf, s.expires_at, t.scopes, t.domain_id, d.kind AS domain_kind
FROM console_sessions s
JOIN domain_tokens t ON t.id = s.token_id
JOIN domains d ON d.id = t.domain_id
WHERE s.id_hash = $1 AND s.ended_at IS NULL AND s.expires_at > now()
  AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now())
  AND d.status <> 'disabled'

-- name: console_session_end
UPDATE console_sessions SET ended_at = now() WHERE id_hash = $1 AND ended_at IS NULL
RETURNING actor

-- name: console_sessions_purge
-- Sessions that ended or expired more than a day ago.
DELETE FROM console_sessions
WHERE coalesce(ended_at, expires_at) < now() - interval '1 day'

-- name: console_overview
-- Every domain with its queue (push peers), dead letters, delivery lag (p99 of the deliveries
-- done in the last hour, from enqueue to done) and the SETs it has not settled.
SELECT d.id, d.kind, d.push, d.status, d.scim_url, d.failing_since, d.last_delivery_at,
       coalesce(q.depth, 0) AS depth, coalesce(q.dead, 0) AS dead, q.oldest_pending,
       l.p99_seconds,
       coalesce(e.pending, 0) AS sets_pending, coalesce(e.sent, 0) AS sets_sent,
       s.delivery AS events_delivery
FROM domains d
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE o.state IN ('pending', 'in_flight')) AS depth,
           count(*) FILTER (WHERE o.state = 'dead') AS dead,
           min(o.created_at) FILTER (WHERE o.state IN ('pending', 'in_flight')) AS oldest_pending
    FROM outbox o
    WHERE o.domain_id = d.id AND o.state IN ('pending', 'in_flight', 'dead')
) q ON true
LEFT JOIN LATERAL (
    SELECT extract(epoch FROM percentile_cont(0.99) WITHIN GROUP (ORDER BY o.updated_at - o.created_at))
               AS p99_seconds
    FROM outbox o
    WHERE o.domain_id = d.id AND o.state = 'done' AND o.updated_at > now() - interval '1 hour'
) l ON true
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE v.state = 'pending') AS pending,
           count(*) FILTER (WHERE v.state = 'sent') AS sent
    FROM security_events v
    WHERE v.domain_id = d.id AND v.state IN ('pending', 'sent')
) e ON true
LEFT JOIN event_subscriptions s ON s.domain_id = d.id
ORDER BY d.kind, d.id

-- name: console_leak_blocks
-- The leak guard's blocks per domain, from the audit log (every block is audited).
SELECT actor AS domain_id, count(*) AS blocks, max(at) AS last_at
FROM audit_log WHERE action = 'leak_blocked'
GROUP BY actor

-- name: console_entity
SELECT internal_id, resource_type, state, merged_into, provision_on_demand, created_at
FROM entities WHERE internal_id = $1

-- name: console_entities
-- Entities ($1) as the console shows them: which exist, and which are merged into which.
SELECT internal_id, resource_type, state, merged_into
FROM entities WHERE internal_id = ANY($1::text[])

-- name: console_operations_of
-- Merges and splits that named entity $1 (survivor, loser, source or new entity).
SELECT id, kind, idempotency_key, request, state, progress, actor, created_at, updated_at
FROM operations
WHERE request ->> 'survivor' = $1 OR request ->> 'source' = $1
   OR request -> 'losers' ? $1 OR request -> 'move' ? $1
ORDER BY created_at DESC
LIMIT 20

-- name: console_deliveries
-- Deliveries of domain $1 (or every domain) in state $2 (or those a person may look at:
-- pending, in flight, dead), newest first, at most $3.
SELECT id, domain_id, internal_id, operation_id, kind, state, attempts, next_attempt_at,
       last_error, created_at, updated_at
FROM outbox
WHERE ($1::text IS NULL OR domain_id = $1)
  AND (CASE WHEN $2::text IS NULL THEN state IN ('pending', 'in_flight', 'dead') ELSE state = $2 END)
ORDER BY id DESC
LIMIT $3

-- name: console_audit
-- The audit log, newest first, filtered by actor ($1, a substring), action ($2), subject ($3)
-- and time ($4: not before), at most $5 rows.
SELECT id, at, actor, action, subject, details
FROM audit_log
WHERE ($1::text IS NULL OR strpos(actor, $1) > 0)
  AND ($2::text IS NULL OR action = $2)
  AND ($3::text IS NULL OR subject = $3)
  AND ($4::timestamptz IS NULL OR at >= $4)
ORDER BY id DESC
LIMIT $5

-- name: console_audit_actions
SELECT DISTINCT action FROM audit_log ORDER BY action
