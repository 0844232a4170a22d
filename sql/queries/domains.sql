-- Named queries of the domains registry (broker/domains.py).

-- name: insert_domain
-- A new domain; or one removed with its mappings kept, added again under its name (it gets its
-- external IDs back). Nothing is returned when the name is taken by a domain that is not removed.
INSERT INTO domains (id, kind, scim_url, credential_ref, push, scope_filter, attribute_policy,
                     deprovision, suspend_for, on_conflict, unlinkable, timestamp_precision)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (id) DO UPDATE
SET scim_url = EXCLUDED.scim_url, credential_ref = EXCLUDED.credential_ref, push = EXCLUDED.push,
    scope_filter = EXCLUDED.scope_filter, attribute_policy = EXCLUDED.attribute_policy,
    deprovision = EXCLUDED.deprovision, suspend_for = EXCLUDED.suspend_for,
    on_conflict = EXCLUDED.on_conflict, unlinkable = EXCLUDED.unlinkable,
    timestamp_precision = EXCLUDED.timestamp_precision, status = 'active', failing_since = NULL,
    updated_at = now()
WHERE domains.status = 'removed' AND domains.kind = EXCLUDED.kind
RETURNING id, kind, scim_url, credential_ref, push, scope_filter, attribute_policy, status, created_at,
       deprovision, suspend_for, on_conflict, failing_since, unlinkable, timestamp_precision

-- name: list_domains
SELECT d.id, d.kind, d.scim_url, d.credential_ref, d.push, d.scope_filter, d.attribute_policy,
       d.status, d.created_at, d.deprovision, d.suspend_for, d.on_conflict, d.failing_since,
       d.unlinkable, d.timestamp_precision
FROM domains d
ORDER BY d.kind, d.id

-- name: domain_by_id
SELECT id, kind, scim_url, credential_ref, push, scope_filter, attribute_policy, status, created_at,
       deprovision, suspend_for, on_conflict, failing_since, unlinkable, timestamp_precision
FROM domains WHERE id = $1

-- name: domain_mapping_counts
SELECT state, count(*) AS n FROM id_mappings WHERE domain_id = $1 GROUP BY state ORDER BY state

-- name: domain_for_change
-- The domain, locked until the change (update, disable, enable, remove) commits.
SELECT id, kind, scim_url, credential_ref, push, scope_filter, attribute_policy, status, created_at,
       deprovision, suspend_for, on_conflict, failing_since, unlinkable, timestamp_precision
FROM domains WHERE id = $1 AND status <> 'removed'
FOR UPDATE

-- name: update_domain
-- Every setting of `broker domain update` at once (the caller merged what changed).
UPDATE domains
SET scim_url = $2, credential_ref = $3, push = $4, scope_filter = $5, attribute_policy = $6,
    deprovision = $7, suspend_for = $8, on_conflict = $9, unlinkable = $10,
    timestamp_precision = $11, updated_at = now()
WHERE id = $1
RETURNING id, kind, scim_url, credential_ref, push, scope_filter, attribute_policy, status, created_at,
       deprovision, suspend_for, on_conflict, failing_since, unlinkable, timestamp_precision

-- name: set_domain_status
-- Disabled, or active again (enabled: its failure record starts afresh).
UPDATE domains
SET status = $2, failing_since = CASE WHEN $2 = 'active' THEN NULL ELSE failing_since END,
    updated_at = now()
WHERE id = $1
RETURNING id, kind, scim_url, credential_ref, push, scope_filter, attribute_policy, status, created_at,
       deprovision, suspend_for, on_conflict, failing_since, unlinkable, timestamp_precision

-- name: release_domain_queue
-- An enabled domain: what waited for it is due now, in order.
UPDATE outbox SET next_attempt_at = now(), updated_at = now()
WHERE domain_id = $1 AND state = 'pending' AND next_attempt_at > now()

-- name: domain_footprint
-- What a domain has in the database, by kind of row (what `domain remove` would touch).
SELECT 'mappings' AS what, count(*) AS n FROM id_mappings WHERE domain_id = $1
UNION ALL
SELECT 'tokens', count(*) FROM domain_tokens WHERE domain_id = $1 AND revoked_at IS NULL
UNION ALL
SELECT 'deliveries pending', count(*) FROM outbox
WHERE domain_id = $1 AND state IN ('pending', 'in_flight')
UNION ALL
SELECT 'dead letters', count(*) FROM outbox WHERE domain_id = $1 AND state = 'dead'
UNION ALL
SELECT 'deliveries finished', count(*) FROM outbox
WHERE domain_id = $1 AND state IN ('done', 'cancelled')
UNION ALL
SELECT 'subscriptions', count(*) FROM event_subscriptions WHERE domain_id = $1
UNION ALL
SELECT 'events unsettled', count(*) FROM security_events
WHERE domain_id = $1 AND state IN ('pending', 'sent')
UNION ALL
SELECT 'peer copies', count(*) FROM peer_copies WHERE domain_id = $1

-- name: delete_domain_outbox
DELETE FROM outbox WHERE domain_id = $1

-- name: delete_domain_copies
DELETE FROM peer_copies WHERE domain_id = $1

-- name: delete_domain_subscription
DELETE FROM event_subscriptions WHERE domain_id = $1

-- name: delete_domain_events
DELETE FROM security_events WHERE domain_id = $1

-- name: delete_domain_tokens
DELETE FROM domain_tokens WHERE domain_id = $1

-- name: delete_domain
DELETE FROM domains WHERE id = $1

-- name: tombstone_domain
-- Removed with its mappings kept: no tokens, deliveries or subscriptions are left to it.
UPDATE domains SET status = 'removed', failing_since = NULL, updated_at = now() WHERE id = $1

-- name: outbound_urls
-- Every address the broker calls out to, checked at start (broker/domains.py).
SELECT id AS domain_id, 'scim_url' AS kind, scim_url AS url FROM domains WHERE scim_url IS NOT NULL
UNION ALL
SELECT domain_id, 'events_endpoint', endpoint FROM event_subscriptions WHERE endpoint IS NOT NULL
ORDER BY 1, 2

-- name: set_domain_correlate
-- The domain's correlation rule (reconciliation, 0015): attributes compared case-insensitively.
UPDATE domains SET correlate = $2, updated_at = now() WHERE id = $1 RETURNING id
