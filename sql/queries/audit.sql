-- Named queries of the audit log (a hash chain, 0013) and of each entity's history.

-- name: audit_chain_rows
-- The log in chain order, with details as the hash covers them (the jsonb's text).
SELECT id, seq, at, actor, action, subject, details::text AS details_text, prev_hash, hash
FROM audit_log ORDER BY seq, id

-- name: audit_chain_head
SELECT last_seq, last_hash FROM audit_chain WHERE singleton

-- name: audit_list
-- Entries about entity $1 (the subject, or named in the details), domain $2 (the subject, or
-- details.domain), since $3; the newest $4, in chain order.
SELECT * FROM (
    SELECT id, seq, at, actor, action, subject, details
    FROM audit_log
    WHERE ($1::text IS NULL OR subject = $1 OR details ->> 'entity' = $1)
      AND ($2::text IS NULL OR subject = $2 OR details ->> 'domain' = $2)
      AND ($3::timestamptz IS NULL OR at >= $3)
    ORDER BY seq DESC
    LIMIT $4
) newest
ORDER BY seq

-- name: history_writes
-- Home's writes of entities $1 (how each: $2, create, put, patch, delete or changed when a poll
-- found it), by domain $3 (NULL: home itself), in the entities' history.
INSERT INTO entity_history (internal_id, domain_id, kind, status)
SELECT w.internal_id, $3, 'write', w.how
FROM unnest($1::text[], $2::text[]) AS w (internal_id, how)

-- name: history_operation
-- A merge or split ($1) in the history of each entity it involved ($4, in role $5).
INSERT INTO entity_history (internal_id, kind, status, details)
SELECT e.internal_id, $1, e.role,
       jsonb_build_object('operation', $2::uuid, 'request', $3::jsonb, 'rows_changed', $6::int)
FROM unnest($4::text[], $5::text[]) AS e (internal_id, role)

-- name: purge_history
-- At most $2 history rows older than $1 seconds, deleted.
DELETE FROM entity_history
WHERE id IN (
    SELECT id FROM entity_history WHERE at < now() - make_interval(secs => $1) LIMIT $2
)

-- name: history_entity
SELECT internal_id, resource_type, state, merged_into FROM entities WHERE internal_id = $1

-- name: history_merged_into
-- The entities merged into $1 (their history is the survivor's too).
SELECT internal_id FROM entities WHERE merged_into = $1 ORDER BY internal_id

-- name: history_by_external
SELECT internal_id FROM id_mappings WHERE domain_id = $1 AND external_id = $2

-- name: history_domain_exists
SELECT EXISTS (SELECT 1 FROM domains WHERE id = $1)

-- name: history_of
-- What touched entities $1, oldest first: the history rows, and the audit entries naming one of
-- them (as subject, or details.entity); since $2; the newest $3.
SELECT * FROM (
    SELECT at, 0 AS source, id, internal_id, kind, domain_id, status, details, NULL::text AS actor
    FROM entity_history
    WHERE internal_id = ANY ($1::text[]) AND ($2::timestamptz IS NULL OR at >= $2)
    UNION ALL
    SELECT at, 1, id, coalesce(subject, details ->> 'entity'), 'audit', details ->> 'domain',
           action, details, actor
    FROM audit_log
    WHERE (subject = ANY ($1::text[]) OR details ->> 'entity' = ANY ($1::text[]))
      AND ($2::timestamptz IS NULL OR at >= $2)
    ORDER BY at DESC, source DESC, id DESC
    LIMIT $3
) newest
ORDER BY at, source, id
