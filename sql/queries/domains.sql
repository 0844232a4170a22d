-- Named queries of the domains registry (broker/domains.py).

-- name: insert_domain
INSERT INTO domains (id, kind, scim_url, credential_ref, push, scope_filter, attribute_policy,
                     deprovision, suspend_for, on_conflict, unlinkable, timestamp_precision)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
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

-- name: update_domain_scim_url
UPDATE domains SET scim_url = $2, updated_at = now() WHERE id = $1
RETURNING id, kind, scim_url, credential_ref, push, scope_filter, attribute_policy, status, created_at,
       deprovision, suspend_for, on_conflict, failing_since

-- name: outbound_urls
-- Every address the broker calls out to, checked at start (broker/domains.py).
SELECT id AS domain_id, 'scim_url' AS kind, scim_url AS url FROM domains WHERE scim_url IS NOT NULL
UNION ALL
SELECT domain_id, 'events_endpoint', endpoint FROM event_subscriptions WHERE endpoint IS NOT NULL
ORDER BY 1, 2

-- name: set_domain_correlate
-- The domain's correlation rule (reconciliation, 0015): attributes compared case-insensitively.
UPDATE domains SET correlate = $2, updated_at = now() WHERE id = $1 RETURNING id
