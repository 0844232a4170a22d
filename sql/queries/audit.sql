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
