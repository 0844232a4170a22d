-- Named queries of the identity map (broker/mapping/store.py, and broker/mapping/accounts.py for
-- the writes a delivery or a recorded change makes on its caller's connection). Parameters are
-- always bound. Every write to id_mappings and entities is here.

-- name: resolve_request
-- Everything a domain's request names, in one round-trip: its external IDs ($2) and the
-- externalId values it gave entities ($3), each -> internal ID.
SELECT 'id' AS kind, m.external_id AS key, m.internal_id
FROM id_mappings m
JOIN entities e ON e.internal_id = m.internal_id AND e.state = 'active'
WHERE m.domain_id = $1 AND m.external_id = ANY($2::text[])
UNION ALL
SELECT 'externalId', m.domain_external_id, m.internal_id
FROM id_mappings m
JOIN entities e ON e.internal_id = m.internal_id AND e.state = 'active'
WHERE m.domain_id = $1 AND m.is_primary AND m.domain_external_id = ANY($3::text[])

-- name: set_domain_external_id
UPDATE id_mappings SET domain_external_id = $3, updated_at = now()
WHERE domain_id = $1 AND internal_id = $2 AND is_primary

-- name: resolve_outbound
-- (domain, internal IDs) -> primary external IDs, in one round-trip. A merged entity is translated
-- as its survivor. Entities seen for the first time are recorded. Where $6 (mint) is true, an
-- entity with no primary in the domain gets the pairwise ID offered for it in $4 (and the
-- correlation handle in $5); otherwise it stays unresolved, for the caller to provision.
WITH wanted AS (
    SELECT *
    FROM unnest($2::text[], $3::text[], $4::text[], $5::text[])
        AS w(asked, resource_type, minted_id, handle)
),
recorded AS (
    -- Only entities not seen before, or seen with no type: a read of known entities writes
    -- nothing, takes no row lock and commits for free.
    INSERT INTO entities (internal_id, resource_type)
    SELECT w.asked, w.resource_type FROM wanted w
    WHERE NOT EXISTS (
        SELECT 1 FROM entities e
        WHERE e.internal_id = w.asked AND (e.resource_type <> 'unknown' OR w.resource_type = 'unknown')
    )
    ON CONFLICT (internal_id) DO UPDATE SET resource_type = EXCLUDED.resource_type
    WHERE entities.resource_type = 'unknown' AND EXCLUDED.resource_type <> 'unknown'
),
live AS (
    SELECT w.asked, coalesce(e.merged_into, w.asked) AS internal_id, w.minted_id, w.handle
    FROM wanted w
    LEFT JOIN entities e ON e.internal_id = w.asked
),
existing AS (
    SELECT l.asked, l.internal_id, m.external_id, m.domain_external_id
    FROM live l
    JOIN id_mappings m
      ON m.internal_id = l.internal_id AND m.domain_id = $1 AND m.is_primary
),
minted AS (
    INSERT INTO id_mappings (internal_id, domain_id, external_id, is_primary, origin, state,
                             correlation_handle)
    SELECT DISTINCT ON (l.internal_id) l.internal_id, $1, l.minted_id, true, 'minted', 'active', l.handle
    FROM live l
    WHERE $6::boolean
      AND NOT EXISTS (SELECT 1 FROM existing x WHERE x.asked = l.asked)
    ORDER BY l.internal_id, l.asked
    ON CONFLICT DO NOTHING
    RETURNING internal_id, external_id
)
SELECT asked, internal_id, external_id, domain_external_id FROM existing WHERE external_id IS NOT NULL
UNION ALL
SELECT l.asked, l.internal_id, n.external_id, NULL FROM live l JOIN minted n ON n.internal_id = l.internal_id

-- name: rows_of_entities
SELECT id, internal_id, domain_id, external_id, is_primary, state, origin
FROM id_mappings
WHERE internal_id = ANY($1::text[])
ORDER BY internal_id, domain_id, created_at, id

-- name: rows_by_external
-- The entity that (domain, external ID) denotes, with all its rows.
SELECT m.id, m.internal_id, m.domain_id, m.external_id, m.is_primary, m.state, m.origin
FROM id_mappings m
WHERE m.internal_id = (
    SELECT internal_id FROM id_mappings WHERE domain_id = $1 AND external_id = $2
)
ORDER BY m.domain_id, m.created_at, m.id

-- name: lock_entities
-- Lock the entities of an operation, and those merged into them (their merged_into moves), in a
-- fixed order so that concurrent operations serialise instead of deadlocking. NO KEY UPDATE: the
-- foreign-key checks of workers writing rows that reference these entities (KEY SHARE) must not
-- wait for an operation that may be waiting for them.
SELECT internal_id, resource_type, state, merged_into
FROM entities
WHERE internal_id = ANY($1::text[]) OR merged_into = ANY($1::text[])
ORDER BY internal_id
FOR NO KEY UPDATE

-- name: lock_rows
SELECT id FROM id_mappings WHERE internal_id = ANY($1::text[]) ORDER BY id FOR UPDATE

-- name: internal_ids_among
-- The leak guard's exact lookup: which of these strings ($1) are internal IDs the broker has
-- recorded. One probe of the primary key each.
SELECT internal_id FROM entities WHERE internal_id = ANY($1::text[])

-- name: register_entities
INSERT INTO entities (internal_id, resource_type)
SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT (internal_id) DO NOTHING

-- name: apply_row_changes
-- Rewrite changed rows and drop removed ones (internal_id NULL) in one statement. Changed rows are
-- deleted and inserted again with their ids, so that no intermediate state can trip the
-- one-primary index while primaries trade places. Aggregating the deleted rows drains the DELETE
-- before the first INSERT (sub-statements of a WITH otherwise run interleaved).
WITH changes AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::boolean[], $4::text[])
        AS c(id, internal_id, is_primary, state)
),
old AS (
    DELETE FROM id_mappings m USING changes c WHERE m.id = c.id RETURNING m AS r
),
gone AS (
    SELECT array_agg(r) AS rows FROM old
)
INSERT INTO id_mappings (id, internal_id, domain_id, external_id, is_primary, origin, state,
                         domain_external_id, correlation_handle, retire_after, created_at, updated_at)
OVERRIDING SYSTEM VALUE
SELECT o.id, c.internal_id, o.domain_id, o.external_id, c.is_primary, o.origin, c.state,
       o.domain_external_id, o.correlation_handle, o.retire_after, o.created_at, now()
FROM gone g
CROSS JOIN LATERAL unnest(g.rows) AS o
JOIN changes c ON c.id = o.id
WHERE c.internal_id IS NOT NULL

-- name: mark_merged
UPDATE entities
SET state = 'merged', merged_into = $1, updated_at = now()
WHERE internal_id = ANY($2::text[]) OR merged_into = ANY($2::text[])

-- name: push_domains
SELECT id FROM domains WHERE push AND kind = 'peer'

-- name: insert_mapping
INSERT INTO id_mappings (internal_id, domain_id, external_id, is_primary, origin, state,
                         domain_external_id, correlation_handle)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING id

-- name: hold_back
-- Split-offs ($1) provisioned on first need ($2 true) or eagerly.
UPDATE entities SET provision_on_demand = $2, updated_at = now()
WHERE internal_id = ANY($1::text[])

-- name: begin_create
-- The pending row of a create in a peer, with its correlation handle; kept if it exists.
-- Returns the handle only when the row is new (no earlier attempt can have reached the peer).
-- The entity is share-locked first: a merge or split in progress on it (which may give it a
-- primary here, or merge it away) finishes before; a merged or deleted entity gets no row.
WITH live AS (
    SELECT internal_id FROM entities WHERE internal_id = $1 AND state = 'active' FOR SHARE
)
INSERT INTO id_mappings (internal_id, domain_id, external_id, is_primary, origin, state,
                         correlation_handle)
SELECT $1, $2, NULL, true, 'peer', 'pending_create', $3 FROM live
ON CONFLICT DO NOTHING
RETURNING correlation_handle

-- name: finish_create
-- The create of correlation handle $1 in peer $2 succeeded with the peer's ID $3. Returns the
-- entity the row belongs to now (a merge may have moved the pending row to its survivor), or
-- nothing when the create is no longer wanted (a merge cancelled it).
WITH finished AS (
    UPDATE id_mappings SET external_id = $3, state = 'active', updated_at = now()
    WHERE correlation_handle = $1 AND domain_id = $2 AND is_primary AND state = 'pending_create'
    RETURNING internal_id
)
SELECT internal_id FROM finished
UNION ALL
-- Finished before (a replay): the account is mapped already.
SELECT internal_id FROM id_mappings WHERE domain_id = $2 AND external_id = $3
LIMIT 1

-- name: retire_primary
-- The peer no longer holds the entity: its row is retired (kept $3 seconds, so that late
-- references still resolve), or dropped if the create never finished.
WITH dropped AS (
    DELETE FROM id_mappings
    WHERE internal_id = $1 AND domain_id = $2 AND is_primary AND state = 'pending_create'
)
UPDATE id_mappings
SET is_primary = false, state = 'retired', retire_after = now() + make_interval(secs => $3),
    updated_at = now()
WHERE internal_id = $1 AND domain_id = $2 AND is_primary AND state = 'active'

-- name: retire_alias
-- The peer deleted the alias ($2 in peer $1): its row is retired for $3 seconds (late
-- references still resolve), or removed at once when the retention is 0.
WITH removed AS (
    DELETE FROM id_mappings
    WHERE domain_id = $1 AND external_id = $2 AND state = 'deletion_required' AND $3 <= 0
)
UPDATE id_mappings
SET state = 'retired', retire_after = now() + make_interval(secs => $3), updated_at = now()
WHERE domain_id = $1 AND external_id = $2 AND state = 'deletion_required' AND $3 > 0

-- name: record_writes
-- Entities home now has (or no longer has, $3), recorded before their syncs are enqueued; and
-- whether any domain subscribes to SETs (if none, the change is not recorded for them).
WITH seen AS (
    INSERT INTO entities (internal_id, resource_type)
    SELECT * FROM unnest($1::text[], $2::text[])
    ON CONFLICT (internal_id) DO UPDATE SET resource_type = EXCLUDED.resource_type
    WHERE entities.resource_type = 'unknown' AND EXCLUDED.resource_type <> 'unknown'
), gone AS (
    UPDATE entities SET state = 'deleted', updated_at = now()
    WHERE internal_id = ANY($3::text[]) AND state = 'active'
)
SELECT EXISTS (SELECT 1 FROM event_subscriptions)

-- name: link_accounts
-- Existing accounts of peer $1 ($3) found by reconciliation to be entities' ($2, of resource
-- types $4): each the entity's primary there, peer-assigned, with a fresh correlation handle
-- ($5). An entity that got a primary meanwhile (a create under way) keeps it. Returns the
-- entities linked.
WITH seen AS (
    INSERT INTO entities (internal_id, resource_type)
    SELECT * FROM unnest($2::text[], $4::text[])
    ON CONFLICT (internal_id) DO NOTHING
)
INSERT INTO id_mappings (internal_id, domain_id, external_id, is_primary, origin, state,
                         correlation_handle)
SELECT a.internal_id, $1, a.external_id, true, 'peer', 'active', a.handle
FROM unnest($2::text[], $3::text[], $5::text[]) AS a(internal_id, external_id, handle)
ON CONFLICT DO NOTHING
RETURNING internal_id
