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

-- name: lookup_outbound
-- (domain, internal IDs) -> primary external IDs, read only: the first step of every outbound
-- translation. A merged entity is translated as its survivor. resource_type is NULL for an entity
-- the broker has not seen, has_primary false where the domain has no primary row for it; those
-- go on to resolve_outbound (mint) or record_seen_entities. Two index probes per ID; the one of
-- id_mappings index-only on a table at rest (0022: the index holds the columns read here).
SELECT w.asked, coalesce(e.merged_into, w.asked) AS internal_id, e.resource_type,
       m.external_id, m.domain_external_id, m.internal_id IS NOT NULL AS has_primary
FROM unnest($2::text[]) AS w(asked)
LEFT JOIN entities e ON e.internal_id = w.asked
LEFT JOIN id_mappings m
  ON m.internal_id = coalesce(e.merged_into, w.asked) AND m.domain_id = $1 AND m.is_primary

-- name: record_seen_entities
-- Entities ($1, with their types $2) a read found unseen, or seen with no type: recorded with
-- an asynchronous commit (set_config(..., true) holds for this statement's own transaction).
-- Losing the row in a crash loses nothing: the next read records it again, and any later
-- synchronous commit that relies on it flushes it first.
INSERT INTO entities (internal_id, resource_type)
SELECT w.asked, w.resource_type
FROM unnest($1::text[], $2::text[]) AS w(asked, resource_type)
CROSS JOIN (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
ON CONFLICT (internal_id) DO UPDATE SET resource_type = EXCLUDED.resource_type
WHERE entities.resource_type = 'unknown' AND EXCLUDED.resource_type <> 'unknown'

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

-- name: begin_creates
-- begin_create for several creates at once (entities $1[i] in peers $2[i], handles $3[i]): the
-- handles of the rows that are new. The entities are share-locked first, in order.
WITH live AS (
    SELECT internal_id FROM entities
    WHERE internal_id = ANY($1::text[]) AND state = 'active'
    ORDER BY internal_id
    FOR SHARE
)
INSERT INTO id_mappings (internal_id, domain_id, external_id, is_primary, origin, state,
                         correlation_handle)
SELECT i.internal_id, i.domain_id, NULL, true, 'peer', 'pending_create', i.handle
FROM unnest($1::text[], $2::text[], $3::text[]) AS i(internal_id, domain_id, handle)
JOIN live ON live.internal_id = i.internal_id
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

-- name: finish_creates
-- finish_create for several creates at once (correlation handles $1[i] in peers $2[i], with the
-- peer's IDs $3[i]): for each, in order, the entity its row belongs to now, or NULL when the
-- create is no longer wanted.
-- Each pending row is found by a probe of its handle (a lateral that LIMIT keeps one), and
-- updated where that probe found it (a TID scan; a row updated meanwhile is followed to its
-- newest version and checked again): as a join, the plan PostgreSQL kept for the prepared
-- statement, made while the table was small, scanned the whole mapping table for every batch.
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY
        AS i(handle, domain_id, external_id, n)
), pending AS (
    SELECT i.n, i.external_id, x.id, x.ctid
    FROM input i
    CROSS JOIN LATERAL (
        SELECT x.id, x.ctid FROM id_mappings x
        WHERE x.correlation_handle = i.handle AND x.domain_id = i.domain_id AND x.is_primary
          AND x.state = 'pending_create'
        LIMIT 1
    ) x
), finished AS (
    UPDATE id_mappings m SET external_id = p.external_id, state = 'active', updated_at = now()
    FROM pending p
    WHERE m.ctid = ANY (ARRAY(SELECT ctid FROM pending)) AND m.id = p.id AND m.is_primary
      AND m.state = 'pending_create'
    RETURNING p.n, m.internal_id
)
SELECT i.n, coalesce(
    f.internal_id,
    -- Finished before (a replay): the account is mapped already.
    (SELECT x.internal_id FROM id_mappings x
     WHERE x.domain_id = i.domain_id AND x.external_id = i.external_id LIMIT 1)) AS owner
FROM input i
LEFT JOIN finished f ON f.n = i.n
ORDER BY i.n

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

-- name: drop_domain_mappings
-- A domain removed without --keep-mappings: its external IDs name nothing any more.
DELETE FROM id_mappings WHERE domain_id = $1

-- name: import_staging
-- The staging table of a mapping import (broker mappings import): the file's well-formed lines,
-- copied in with COPY, checked set-based, then written with one INSERT ... SELECT. Dropped with
-- the transaction.
-- Its IDs compare as bytes, as the mapping table's do (0020).
CREATE TEMPORARY TABLE mapping_import (
    line         bigint NOT NULL,
    internal_id  text COLLATE "C" NOT NULL,
    domain_id    text COLLATE "C" NOT NULL,
    external_id  text COLLATE "C" NOT NULL,
    is_primary   boolean NOT NULL,
    handle       text COLLATE "C" NOT NULL
) ON COMMIT DROP

-- name: import_analyze
-- Temporary tables are never analysed by autovacuum: the checks' plans need the counts.
ANALYZE mapping_import

-- name: import_analyze_table
-- The bulk path's checks read the mapping table itself, just loaded: its counts, for their plans.
ANALYZE id_mappings

-- name: import_bulk_view
-- The bulk path (broker/mapping/bulkload.py): the rows it copied straight into the emptied
-- mapping table, seen under the staging table's name and columns, so that the same checks
-- (import_problems with $2 true, import_duplicates) and import_entities read them. line is the
-- row's id (1, 2, ... in COPY's order), turned back into the file's line by the caller.
CREATE TEMPORARY VIEW mapping_import AS
SELECT id AS line, internal_id, domain_id, external_id, is_primary, correlation_handle AS handle
FROM id_mappings

-- name: import_bulk_view_drop
DROP VIEW mapping_import

-- name: import_temp_buffers
-- The import's session keeps its staging table in memory (temp_buffers: this session, set before
-- it touches any temporary table; the import closes the session after).
SELECT set_config('temp_buffers', $1, false)

-- name: import_memory
-- Memory for the import's hash joins and aggregates, for this transaction only.
SELECT set_config('work_mem', $1, true)

-- name: import_lock_entities
-- The entities the file names that exist already, share-locked in ID order (the order merges
-- lock them in): no merge, split or delete changes them before the import commits.
SELECT count(*) FROM (
    SELECT 1 FROM entities
    WHERE internal_id IN (SELECT internal_id FROM mapping_import)
    ORDER BY internal_id
    FOR SHARE
) AS locked

-- name: import_problems
-- Every staged line that breaks an invariant of the mapping table but the two duplicate checks
-- (import_duplicates), with what to do; the first $1 by line, each with the total count. With $2
-- (the bulk path: mapping_import is a view of the table, which was empty), the two checks
-- against rows already in the table are left out (a one-time filter: never run).
-- Set-based: a handful of hash joins however long the file (at 10M lines a scan of the staging
-- table each, a few seconds).
WITH problems AS (
    SELECT s.line, format('domain %s is not known: add it first (broker domain add) or fix the line', s.domain_id) AS message
    FROM mapping_import s LEFT JOIN domains d ON d.id = s.domain_id
    WHERE d.id IS NULL
    UNION ALL
    SELECT s.line, format('%s is the home domain: its IDs are the internal IDs, so it has no mapping rows', s.domain_id)
    FROM mapping_import s JOIN domains d ON d.id = s.domain_id AND d.kind = 'home'
    UNION ALL
    SELECT s.line, format('external ID %s in %s is already in the mapping table: leave the line out', s.external_id, s.domain_id)
    FROM mapping_import s JOIN id_mappings m USING (domain_id, external_id)
    WHERE NOT $2::boolean
    UNION ALL
    SELECT s.line, format('%s already has a primary ID in %s: mark the line primary false, or leave it out', s.internal_id, s.domain_id)
    FROM mapping_import s JOIN id_mappings m USING (internal_id, domain_id)
    WHERE s.is_primary AND m.is_primary AND NOT $2::boolean
    UNION ALL
    SELECT s.line, CASE e.state
        WHEN 'merged' THEN format('%s was merged into %s: map %s instead', s.internal_id, e.merged_into, e.merged_into)
        ELSE format('%s is %s in home: leave the line out', s.internal_id, e.state) END
    FROM mapping_import s JOIN entities e USING (internal_id)
    WHERE e.state <> 'active'
    UNION ALL
    SELECT s.line, format('external ID %s is an internal ID: a domain must never see one', s.external_id)
    FROM mapping_import s
    -- One hash semi-join. Not two EXISTS joined by OR: the planner cannot make an OR of
    -- EXISTS a join, and once the staging table's IDs no longer fit work_mem as a hashed
    -- subplan (about 10M lines), it scanned the staging table once per line.
    WHERE s.external_id IN (SELECT internal_id FROM entities
                            UNION ALL SELECT internal_id FROM mapping_import)
)
SELECT line, message, count(*) OVER () AS total FROM problems ORDER BY line, message LIMIT $1

-- name: import_duplicates
-- The staged lines that repeat an earlier line's external ID in its domain, or give an entity a
-- second primary in a domain; the first $1 by line, each with the total count. Two aggregates
-- over the whole file: at 10M lines they spill past work_mem and take about 30 s each (load 4).
-- The bulk path skips them: the unique indexes it builds find the same duplicates, and only
-- then is this run, to name the lines. Each message names the earlier line: it is head, first,
-- tail, put together by the caller (the bulk path numbers lines by row and turns both back).
WITH external_twice AS (
    SELECT domain_id, external_id, min(line) AS first
    FROM mapping_import GROUP BY domain_id, external_id HAVING count(*) > 1
),
primary_twice AS (
    SELECT internal_id, domain_id, min(line) AS first
    FROM mapping_import WHERE is_primary GROUP BY internal_id, domain_id HAVING count(*) > 1
),
problems AS (
    SELECT s.line, format('external ID %s in %s is also on line ', s.external_id, s.domain_id) AS head,
           t.first, ': an external ID denotes one entity' AS tail
    FROM mapping_import s JOIN external_twice t USING (domain_id, external_id)
    WHERE s.line > t.first
    UNION ALL
    SELECT s.line, format('a second primary for %s in %s (the first is on line ', s.internal_id, s.domain_id),
           t.first, '): mark all but one primary false'
    FROM mapping_import s JOIN primary_twice t USING (internal_id, domain_id)
    WHERE s.is_primary AND s.line > t.first
)
SELECT line, head, first, tail, count(*) OVER () AS total FROM problems ORDER BY line, head LIMIT $1

-- name: import_entities
-- The entities a checked import names that the broker has not seen: their type is learnt from
-- home the first time a domain reads them ('unknown' until then, as resolve_outbound does).
-- In key order: each new key lands next to the one before it in entities_pkey, so a million new
-- entities touch each leaf page once instead of at random.
INSERT INTO entities (internal_id, resource_type)
SELECT internal_id, 'unknown' FROM mapping_import GROUP BY internal_id ORDER BY internal_id
ON CONFLICT (internal_id) DO NOTHING

-- name: import_rows
-- A checked import's rows. A push peer's IDs are the ones it assigned (origin peer), any other
-- domain's were issued outside the broker and behave as minted ones (nothing to delete behind an
-- alias). A non-primary line is an alias kept for good (retired, no retire_after): it resolves
-- inbound and is never used outbound. Each row gets the random correlation handle (132 bits) staged
-- with it.
-- Inserts are not announced on broker_mappings (0003): no notification per row, and no cache
-- holds a miss.
INSERT INTO id_mappings (internal_id, domain_id, external_id, is_primary, origin, state,
                         correlation_handle)
SELECT s.internal_id, s.domain_id, s.external_id, s.is_primary,
       CASE WHEN d.push THEN 'peer' ELSE 'minted' END,
       CASE WHEN s.is_primary THEN 'active' ELSE 'retired' END,
       s.handle
FROM mapping_import s
JOIN domains d ON d.id = s.domain_id

-- name: import_lock_timeout
-- How long the bulk path of an import waits for its exclusive locks before it takes the ordinary
-- path instead (this transaction only). Answers the setting it replaces, to be set back after.
SELECT previous, set_config('lock_timeout', $1, true) AS now
FROM (SELECT current_setting('lock_timeout') AS previous) AS before

-- name: import_bulk_lock
-- The bulk path of an import (a large file into an EMPTY mapping table): the mapping table and
-- the two tables its foreign keys reference, locked against every reader and writer until the
-- import commits. Taken in a savepoint; given up (rolled back) if the table is not empty.
LOCK TABLE id_mappings, entities, domains IN ACCESS EXCLUSIVE MODE

-- name: import_table_empty
SELECT NOT EXISTS (SELECT 1 FROM id_mappings)

-- name: import_shed_indexes
-- The bulk path, step 1 (PostgreSQL's "Populating a Database": remove indexes and foreign keys,
-- load, build them again): the definition of every constraint that has an index or names another
-- table (primary key, unique, foreign key) and of every other index of id_mappings is kept in a
-- temporary table, and then each is dropped (nothing references id_mappings' key). The
-- rows were checked set-based before (import_problems), so every invariant holds when they are
-- built again; building them by sorting costs far less than one index insert and two foreign-key
-- probes per row. Read from the catalog, so a later migration's index is handled as well.
DO $$
DECLARE
    d record;
BEGIN
    CREATE TEMPORARY TABLE mapping_import_rebuild ON COMMIT DROP AS
    SELECT 1 AS step, format('ALTER TABLE id_mappings DROP CONSTRAINT %I', c.conname) AS shed,
           format('ALTER TABLE id_mappings ADD CONSTRAINT %I %s', c.conname,
                  pg_get_constraintdef(c.oid)) AS build
    FROM pg_constraint c
    WHERE c.conrelid = 'id_mappings'::regclass AND c.contype IN ('p', 'u', 'f')
    UNION ALL
    SELECT 0, format('DROP INDEX %s', i.indexrelid::regclass), pg_get_indexdef(i.indexrelid)
    FROM pg_index i
    WHERE i.indrelid = 'id_mappings'::regclass AND NOT i.indisprimary
      AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid);
    FOR d IN SELECT shed FROM mapping_import_rebuild ORDER BY step DESC LOOP
        EXECUTE d.shed;
    END LOOP;
END
$$

-- name: import_truncate
-- The bulk path, after its lock and its check that the table is empty: the empty table truncated
-- in the import's transaction gets a new file. With wal_level = minimal (the embedded server's),
-- PostgreSQL then writes the rows and the index builds without the write-ahead log, and syncs
-- the files at commit instead; a rollback leaves the old, empty file. Nothing references
-- id_mappings, so nothing else is truncated. Its ids start again at 1: the rows' ids are then
-- their order in the file.
TRUNCATE id_mappings RESTART IDENTITY

-- name: import_build_memory
-- Memory for each index build of the bulk path (this transaction only).
SELECT set_config('maintenance_work_mem', $1, true)

-- name: import_build_indexes
-- The bulk path, last step: every index, unique constraint and foreign key shed before, built
-- again as it was defined (a sort each; a foreign key is checked with one join).
DO $$
DECLARE
    d record;
BEGIN
    FOR d IN SELECT build FROM mapping_import_rebuild ORDER BY step, build LOOP
        EXECUTE d.build;
    END LOOP;
END
$$

-- name: export_mappings
-- The mapping rows a file carries (broker mappings export): every row with an external ID of a
-- live entity, of one domain ($1) or all (NULL). Read through a server-side cursor.
SELECT m.internal_id, m.domain_id, m.external_id, m.is_primary
FROM id_mappings m
JOIN entities e ON e.internal_id = m.internal_id AND e.state = 'active'
WHERE m.external_id IS NOT NULL AND ($1::text IS NULL OR m.domain_id = $1)

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

-- name: journal_write
-- A write home took, recorded in one statement when no domain subscribes to SETs (the common
-- case; its own transaction then): what record_writes, history_writes, enqueue_sync and
-- enqueue_sync_sealed do, in that order's effect. $1/$2: entities home now has and their types;
-- $3: entities it no longer has; $4: every entity the write touched, in order, with how ($5) and
-- its sealed write-only values ($6, NULL for none); $7: the writing domain (NULL: home itself).
-- If some domain subscribes, nothing is written and the answer is false: the caller records the
-- write in a transaction of its own (the SETs need the previous documents first).
WITH quiet AS (
    SELECT NOT EXISTS (SELECT 1 FROM event_subscriptions) AS ok
), seen AS (
    INSERT INTO entities (internal_id, resource_type)
    SELECT w.internal_id, w.resource_type
    FROM unnest($1::text[], $2::text[]) AS w (internal_id, resource_type), quiet
    WHERE quiet.ok
    ON CONFLICT (internal_id) DO UPDATE SET resource_type = EXCLUDED.resource_type
    WHERE entities.resource_type = 'unknown' AND EXCLUDED.resource_type <> 'unknown'
), gone AS (
    UPDATE entities SET state = 'deleted', updated_at = now()
    FROM quiet
    WHERE quiet.ok AND internal_id = ANY($3::text[]) AND state = 'active'
), history AS (
    INSERT INTO entity_history (internal_id, domain_id, kind, status)
    SELECT w.internal_id, $7, 'write', w.how
    FROM unnest($4::text[], $5::text[]) AS w (internal_id, how), quiet
    WHERE quiet.ok
), touched AS (
    SELECT w.internal_id, w.sealed
    FROM unnest($4::text[], $6::bytea[]) AS w (internal_id, sealed), quiet
    WHERE quiet.ok
), plain AS (
    -- DO NOTHING takes no lock on a waiting sync (see enqueue_sync).
    INSERT INTO outbox (domain_id, internal_id, kind)
    SELECT d.id, t.internal_id, 'sync'
    FROM domains d CROSS JOIN touched t
    WHERE t.sealed IS NULL
      AND d.kind = 'peer' AND d.push AND d.status <> 'removed' AND d.id IS DISTINCT FROM $7
    ORDER BY t.internal_id, d.id
    ON CONFLICT (domain_id, internal_id) WHERE state = 'pending' AND kind = 'sync' DO NOTHING
), carrying AS (
    INSERT INTO outbox (domain_id, internal_id, kind, sealed_values)
    SELECT d.id, t.internal_id, 'sync', t.sealed
    FROM domains d CROSS JOIN touched t
    WHERE t.sealed IS NOT NULL
      AND d.kind = 'peer' AND d.push AND d.status <> 'removed' AND d.id IS DISTINCT FROM $7
    ORDER BY t.internal_id, d.id
    ON CONFLICT (domain_id, internal_id) WHERE state = 'pending' AND kind = 'sync'
    DO UPDATE SET sealed_values = EXCLUDED.sealed_values, updated_at = now()
)
SELECT ok FROM quiet
