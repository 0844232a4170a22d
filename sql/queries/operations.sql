-- Named queries of merge and split operations, their outbox rows and the audit log.

-- name: claim_operation
-- Record an operation under its idempotency key; returns nothing when the key is taken (a
-- concurrent insert with the same key waits for the other transaction, then returns nothing).
INSERT INTO operations (id, kind, idempotency_key, request, actor)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id

-- name: operation_by_key
SELECT id, kind, idempotency_key, request, state, progress, actor, created_at, updated_at
FROM operations WHERE idempotency_key = $1

-- name: operation_by_id
SELECT id, kind, idempotency_key, request, state, progress, actor, created_at, updated_at
FROM operations WHERE id = $1

-- name: recent_operations
SELECT id, kind, idempotency_key, request, state, progress, actor, created_at, updated_at
FROM operations ORDER BY created_at DESC LIMIT $1

-- name: finish_planning
UPDATE operations SET state = $2, progress = $3, updated_at = now()
WHERE id = $1
RETURNING id, kind, idempotency_key, request, state, progress, actor, created_at, updated_at

-- name: enqueue_tasks
-- Outbox rows for a plan's peer tasks, in the plan's order (ids ascend with ordinality).
INSERT INTO outbox (domain_id, internal_id, operation_id, kind, payload)
SELECT t.domain_id, t.internal_id, $1, t.kind, t.payload
FROM unnest($2::text[], $3::text[], $4::text[], $5::jsonb[])
    WITH ORDINALITY AS t(domain_id, internal_id, kind, payload, n)
ORDER BY t.n

-- name: cancel_tasks
-- Pending deliveries a plan made unnecessary: the provisioning of an entity whose create is
-- cancelled, the clean-up of an alias whose delete is cancelled.
UPDATE outbox o
SET state = 'cancelled', updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS c(kind, domain_id, internal_id, external_id)
WHERE o.state = 'pending'
  AND o.domain_id = c.domain_id
  AND (
      (c.kind = 'cancel_create' AND o.kind = 'provision' AND o.internal_id = c.internal_id)
      OR (c.kind = 'cancel_delete' AND o.kind IN ('move_memberships', 'delete_alias')
          AND o.payload ->> 'external_id' = c.external_id)
  )
RETURNING o.operation_id

-- name: audit
INSERT INTO audit_log (actor, action, subject, details) VALUES ($1, $2, $3, $4)

-- name: rows_moved
-- Mapping rows that changed owner or primary flag in peers ($1 domains, $2 entities before,
-- $3 after): what the peers last received of those entities no longer describes their accounts.
-- Dropped, so the next sync sends the whole resource (PUT).
DELETE FROM peer_copies c
USING unnest($1::text[], $2::text[], $3::text[]) AS m(domain_id, before_id, after_id)
WHERE c.domain_id = m.domain_id AND c.internal_id IN (m.before_id, m.after_id)

-- name: enqueue_handover
-- Entities ($2) whose account in push peers ($1) changed hands from a previous owner ($3): a
-- sync each, to bring the account to its new owner's state (after whatever the previous owner
-- had under way there), or to create one for an entity left without.
INSERT INTO outbox (domain_id, internal_id, kind, payload)
SELECT DISTINCT ON (m.domain_id, m.internal_id) m.domain_id, m.internal_id, 'sync',
       jsonb_build_object('after', jsonb_build_array(m.previous))
FROM unnest($1::text[], $2::text[], $3::text[]) AS m(domain_id, internal_id, previous)
JOIN domains d ON d.id = m.domain_id AND d.kind = 'peer' AND d.push
ON CONFLICT (domain_id, internal_id) WHERE state = 'pending' AND kind = 'sync'
DO UPDATE SET payload = EXCLUDED.payload, updated_at = now()

-- name: provision_on_need
-- Split-offs ($2) held back from push peer $1 that it needs now (it read something naming
-- them): a provisioning delivery each, unless it has an account or one is on its way.
INSERT INTO outbox (domain_id, internal_id, kind)
SELECT $1, e.internal_id, 'provision'
FROM entities e
JOIN domains d ON d.id = $1 AND d.kind = 'peer' AND d.push
WHERE e.internal_id = ANY($2::text[]) AND e.state = 'active' AND e.provision_on_demand
  AND NOT EXISTS (SELECT 1 FROM id_mappings m
                  WHERE m.domain_id = $1 AND m.internal_id = e.internal_id AND m.is_primary)
  AND NOT EXISTS (SELECT 1 FROM outbox o
                  WHERE o.domain_id = $1 AND o.internal_id = e.internal_id
                    AND o.state IN ('pending', 'in_flight'))

-- name: undo_creates
-- Creates a plan cancelled (rows $1 about to be removed): an earlier attempt may have made the
-- resource in the peer with its answer lost, so each gets an undo_create delivery that looks the
-- handle up there and deletes what it finds.
INSERT INTO outbox (domain_id, internal_id, operation_id, kind, payload)
SELECT m.domain_id, m.internal_id, $2, 'undo_create',
       jsonb_build_object('correlation_handle', m.correlation_handle)
FROM id_mappings m
JOIN domains d ON d.id = m.domain_id AND d.kind = 'peer' AND d.push
WHERE m.id = ANY($1::bigint[]) AND m.state = 'pending_create' AND m.correlation_handle IS NOT NULL

-- name: resync_groups_naming
-- Accounts that changed hands in push peers ($1 domains, $2 the accounts): the broker's groups
-- there that name them are synced again, to name whoever home says.
INSERT INTO outbox (domain_id, internal_id, kind)
SELECT DISTINCT c.domain_id, c.internal_id, 'sync'
FROM unnest($1::text[], $2::text[]) AS a(domain_id, external_id)
JOIN peer_copies c ON c.domain_id = a.domain_id
 AND c.document -> 'members' @> jsonb_build_array(jsonb_build_object('value', a.external_id))
ON CONFLICT (domain_id, internal_id) WHERE state = 'pending' AND kind = 'sync' DO NOTHING
