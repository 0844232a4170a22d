-- Named queries of reconciliation and initial sync (broker/reconcile/).

-- name: domain_correlate
SELECT correlate, initial_sync FROM domains WHERE id = $1

-- name: reconcile_mapped
-- The mapping rows of a page of peer $1's accounts ($2), with the broker's record of the entity.
SELECT m.external_id, m.internal_id, m.is_primary, e.state AS entity_state
FROM id_mappings m
JOIN entities e ON e.internal_id = m.internal_id
WHERE m.domain_id = $1 AND m.external_id = ANY($2::text[])

-- name: reconcile_primaries
-- The primary rows in peer $1 of entities $2 (an account, or a create under way).
SELECT internal_id, external_id, state FROM id_mappings
WHERE domain_id = $1 AND internal_id = ANY($2::text[]) AND is_primary

-- name: start_reconciliation
INSERT INTO reconciliations (id, domain_id, dry_run, initial_sync, options)
VALUES ($1, $2, $3, $4, $5)

-- name: unfinished_reconciliation
SELECT id, domain_id, dry_run, initial_sync, options, phase, resource_type, cursor, peer_total,
       counts, reason, created_at, updated_at
FROM reconciliations WHERE domain_id = $1 AND phase IN ('index', 'peer', 'home', 'actions')

-- name: reconciliation_by_id
SELECT id, domain_id, dry_run, initial_sync, options, phase, resource_type, cursor, peer_total,
       counts, reason, created_at, updated_at
FROM reconciliations WHERE id = $1

-- name: latest_reconciliations
-- The latest run of each domain ($1: initial syncs only).
SELECT DISTINCT ON (domain_id) id, domain_id, dry_run, initial_sync, options, phase,
       resource_type, cursor, peer_total, counts, reason, created_at, updated_at
FROM reconciliations WHERE initial_sync OR NOT $1
ORDER BY domain_id, created_at DESC

-- name: abandon_reconciliation
UPDATE reconciliations SET phase = 'failed', reason = $2, updated_at = now()
WHERE id = $1 AND phase IN ('index', 'peer', 'home', 'actions')

-- name: advance_reconciliation
-- Where the run is: written with the page's items, so a run resumed after a crash reads on
-- from the first page not recorded.
UPDATE reconciliations
SET phase = $2, resource_type = $3, cursor = $4, peer_total = peer_total + $5, updated_at = now()
WHERE id = $1

-- name: record_items
INSERT INTO reconciliation_items (run_id, resource_type, situation, external_id, internal_id,
                                  action, detail)
SELECT $1, i.resource_type, i.situation, i.external_id, i.internal_id, i.action, i.detail
FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::jsonb[])
    WITH ORDINALITY AS i(resource_type, situation, external_id, internal_id, action, detail, n)
ORDER BY i.n
ON CONFLICT DO NOTHING

-- name: disputes_across_pages
-- Accounts on different pages that each matched the same entity alone: all disputed.
UPDATE reconciliation_items i
SET situation = 'disputed', action = 'report',
    detail = jsonb_build_object('reason', 'several peer accounts match one home entity')
WHERE i.run_id = $1 AND i.situation = 'unlinked' AND i.internal_id IN (
    SELECT internal_id FROM reconciliation_items
    WHERE run_id = $1 AND situation IN ('unlinked', 'disputed') AND internal_id IS NOT NULL
      AND external_id IS NOT NULL
    GROUP BY internal_id HAVING count(*) > 1
)

-- name: missing_mapped
-- Entities mapped in peer $2 whose account the pass never saw: the peer lacks them.
INSERT INTO reconciliation_items (run_id, resource_type, situation, external_id, internal_id,
                                  action, detail)
SELECT $1, e.resource_type, 'missing', m.external_id, m.internal_id, $3,
       jsonb_build_object('reason', 'mapped, the peer lacks it')
FROM id_mappings m
JOIN entities e ON e.internal_id = m.internal_id AND e.state = 'active'
WHERE m.domain_id = $2 AND m.is_primary AND m.state = 'active'
  AND e.resource_type = ANY($4::text[])
  AND NOT EXISTS (SELECT 1 FROM reconciliation_items i
                  WHERE i.run_id = $1 AND i.external_id = m.external_id)
ON CONFLICT DO NOTHING

-- name: record_home
-- A page of home's entities (the run's copy, removed when it ends); each entity's keys joined
-- by the unit separator (U+001F).
INSERT INTO reconciliation_home (run_id, internal_id, resource_type, in_scope, keys, document)
SELECT $1, h.internal_id, $2, $3, coalesce(string_to_array(nullif(h.keys, ''), E'\x1f'), '{}'),
       h.document
FROM unnest($4::text[], $5::text[], $6::jsonb[]) AS h(internal_id, keys, document)
ON CONFLICT (run_id, internal_id) DO NOTHING

-- name: home_in_scope
-- Of the run's copy of home, entities $2 are within the domain's scope.
UPDATE reconciliation_home SET in_scope = true
WHERE run_id = $1 AND internal_id = ANY($2::text[])

-- name: home_by_keys
-- The run's home entities holding any of the correlation keys $2.
SELECT internal_id, in_scope, keys, document FROM reconciliation_home
WHERE run_id = $1 AND keys && $2::text[]

-- name: home_by_id
SELECT internal_id, in_scope, keys, document FROM reconciliation_home
WHERE run_id = $1 AND internal_id = ANY($2::text[])

-- name: unprovisioned
-- Home's entities in peer $2's scope with no primary there and no account of the run claiming
-- them (nor disputed between them and others): the peer lacks them. Users before groups.
INSERT INTO reconciliation_items (run_id, resource_type, situation, external_id, internal_id,
                                  action, detail)
SELECT $1, h.resource_type, 'missing', NULL, h.internal_id, $3,
       jsonb_build_object('reason', 'not in the peer')
FROM reconciliation_home h
WHERE h.run_id = $1 AND h.in_scope
  AND NOT EXISTS (SELECT 1 FROM id_mappings m
                  WHERE m.domain_id = $2 AND m.internal_id = h.internal_id AND m.is_primary)
  AND NOT EXISTS (SELECT 1 FROM reconciliation_items i
                  WHERE i.run_id = $1 AND i.internal_id = h.internal_id)
  AND NOT EXISTS (SELECT 1 FROM reconciliation_items i
                  WHERE i.run_id = $1 AND i.detail -> 'candidates' ? h.internal_id)
ORDER BY h.resource_type <> 'User', h.internal_id
ON CONFLICT DO NOTHING

-- name: forget_home
DELETE FROM reconciliation_home WHERE run_id = $1

-- name: item_counts
SELECT situation, action, count(*) AS n, count(*) FILTER (WHERE done) AS done
FROM reconciliation_items WHERE run_id = $1
GROUP BY situation, action ORDER BY situation, action

-- name: report_items
-- The run's items in order, after seq $3, at most $4 ($2: the situations, NULL for all).
SELECT seq, resource_type, situation, external_id, internal_id, action, detail, done
FROM reconciliation_items
WHERE run_id = $1 AND ($2::text[] IS NULL OR situation = ANY($2::text[])) AND seq > $3
ORDER BY seq LIMIT $4

-- name: actionable_items
-- The run's next actions not yet taken: users before groups (a group names its members). Read in
-- order from reconciliation_items_actionable (0023), not sorted.
SELECT seq, resource_type, situation, external_id, internal_id, action, detail
FROM reconciliation_items
WHERE run_id = $1 AND NOT done AND action <> 'report'
ORDER BY resource_type <> 'User', seq
LIMIT $2

-- name: items_done
UPDATE reconciliation_items SET done = true WHERE run_id = $1 AND seq = ANY($2::bigint[])

-- name: finish_reconciliation
UPDATE reconciliations SET phase = $2, counts = $3, reason = $4, updated_at = now() WHERE id = $1

-- name: enqueue_orphan_deletes
-- Orphan accounts ($2, of resource types $3) of peer $1 to deprovision: they belong to no
-- entity; the delivery deletes each only if it is still unmapped then.
INSERT INTO outbox (domain_id, internal_id, kind, payload)
SELECT $1, NULL, 'delete_orphan', jsonb_build_object('external_id', a.external_id,
                                                      'resource_type', a.resource_type)
FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS a(external_id, resource_type, n)
ORDER BY a.n

-- name: drop_copies
DELETE FROM peer_copies WHERE domain_id = $1 AND internal_id = ANY($2::text[])

-- name: initial_syncs_wanted
-- Push domains whose initial sync is needed, or was under way in a process that stopped.
SELECT id FROM domains
WHERE kind = 'peer' AND push AND status <> 'disabled' AND initial_sync IN ('needed', 'running')
ORDER BY id

-- name: lock_initial_sync
-- Whether this session now holds domain $2's initial sync ($1: the advisory lock's class), and
-- the sync is still wanted (another process may have finished it meanwhile).
SELECT pg_try_advisory_lock($1, hashtext($2))

-- name: initial_sync_state
SELECT initial_sync FROM domains WHERE id = $1

-- name: release_initial_sync
SELECT pg_advisory_unlock($1, hashtext($2))

-- name: set_initial_sync
UPDATE domains SET initial_sync = $2, updated_at = now() WHERE id = $1 AND kind = 'peer' AND push
RETURNING id

-- name: initial_sync_progress
-- Push domains' initial sync: its state, and of its latest run the entities to bring over and
-- how many have their account in the peer now.
SELECT d.id, d.initial_sync,
       (SELECT count(*) FROM reconciliation_items i
        WHERE i.run_id = r.id AND i.action IN ('create', 'link')) AS wanted,
       (SELECT count(*) FROM reconciliation_items i
        JOIN id_mappings m ON m.domain_id = d.id AND m.internal_id = i.internal_id
         AND m.is_primary AND m.state = 'active'
        WHERE i.run_id = r.id AND i.action IN ('create', 'link')) AS arrived
FROM domains d
LEFT JOIN LATERAL (
    SELECT id FROM reconciliations x WHERE x.domain_id = d.id AND x.initial_sync
    ORDER BY x.created_at DESC LIMIT 1
) r ON true
WHERE d.kind = 'peer' AND d.push AND ($1::text IS NULL OR d.id = $1)
ORDER BY d.id

-- name: flush_home_keys
-- The run's copy of home has just been written: its keys move from the GIN index's pending list
-- (which every search scans from end to end) into the index proper.
SELECT gin_clean_pending_list('reconciliation_home_keys'::regclass)

-- name: analyze_home_copy
-- Statistics for the run's copy of home, written since autovacuum last looked (or never).
ANALYZE reconciliation_home

-- name: analyze_items
-- Statistics for the items the peer pass wrote, before the statements that join them.
ANALYZE reconciliation_items
