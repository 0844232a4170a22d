-- Change notification: changes recorded once, a SET per subscribed domain, push through the
-- outbox, poll by acknowledgement.

-- name: previous_documents
-- The last document recorded for each entity: the base its next change is compared with.
SELECT a.internal_id, p.document
FROM unnest($1::text[]) AS a (internal_id)
LEFT JOIN LATERAL (
    SELECT c.document FROM home_changes c
    WHERE c.internal_id = a.internal_id AND c.document IS NOT NULL
      AND NOT c.kinds && ARRAY['merge', 'split']
    ORDER BY c.id DESC
    LIMIT 1
) p ON true

-- name: record_changes
-- Changes ($1: [{internal_id, kinds, attributes, document}]) made through domain $2 (NULL: home
-- or its tools), each recorded once with its txn, a SET for each domain subscribed to the
-- resource type and to one of the attributes touched (creates, deletes and (de)activations
-- always), never for the domain the change came from; a push delivery for each pushed SET.
WITH incoming AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb)
        AS x (internal_id text, kinds text[], attributes text[], document jsonb)
), changes AS (
    INSERT INTO home_changes (txn, internal_id, kinds, attributes, document, origin)
    SELECT gen_random_uuid(), internal_id, kinds, attributes, document, $2 FROM incoming
    RETURNING id, internal_id, kinds, attributes
), events AS (
    INSERT INTO security_events (domain_id, change_id, internal_id, jti)
    SELECT s.domain_id, c.id, c.internal_id, gen_random_uuid()::text
    FROM changes c
    JOIN entities e ON e.internal_id = c.internal_id
    JOIN event_subscriptions s ON e.resource_type = ANY (s.resource_types)
    -- A disabled domain's SETs wait for it (nothing is lost); a removed one gets none.
    JOIN domains d ON d.id = s.domain_id AND d.status <> 'removed'
    WHERE s.domain_id IS DISTINCT FROM $2
      AND (s.attributes IS NULL
           OR c.kinds && ARRAY['create', 'delete', 'activate', 'deactivate']
           OR cardinality(c.attributes) = 0
           OR EXISTS (SELECT 1 FROM unnest(c.attributes) a, unnest(s.attributes) b
                      WHERE lower(a) = lower(b)
                         OR lower(a) LIKE '%:' || lower(b)
                         OR lower(b) LIKE lower(a) || '.%'))
    ORDER BY c.id, s.domain_id
    RETURNING id, domain_id, internal_id
)
INSERT INTO outbox (domain_id, internal_id, kind, payload)
SELECT ev.domain_id, ev.internal_id, 'set', jsonb_build_object('event', ev.id)
FROM events ev JOIN event_subscriptions s ON s.domain_id = ev.domain_id
WHERE s.delivery = 'push'
ORDER BY ev.id

-- name: events_to_render
-- A domain's unsettled SETs: the given ones ($2), or else the first $3, in order.
SELECT v.id, v.jti, v.token, v.state, v.internal_id, c.txn, c.kinds, c.attributes,
       c.document, extract(epoch FROM c.at)::bigint AS at, e.resource_type, s.detail
FROM security_events v
JOIN home_changes c ON c.id = v.change_id
JOIN entities e ON e.internal_id = v.internal_id
JOIN event_subscriptions s ON s.domain_id = v.domain_id
WHERE v.domain_id = $1
  AND v.state IN ('pending', 'sent')
  AND ($2::bigint[] IS NULL OR v.id = ANY ($2))
ORDER BY v.id
LIMIT $3

-- name: save_rendered
-- SETs signed ($2 ids, $3 tokens, with key $4), and those the domain must not get ($5: out of
-- its scope, or about an entity it has no ID for).
WITH signed AS (
    UPDATE security_events v SET token = t.token, kid = $4
    FROM unnest($2::bigint[], $3::text[]) AS t (id, token)
    WHERE v.id = t.id AND v.domain_id = $1 AND v.token IS NULL
), skipped AS (
    UPDATE security_events SET state = 'skipped', settled_at = now()
    WHERE domain_id = $1 AND id = ANY ($5::bigint[]) AND state = 'pending'
    RETURNING id, domain_id, internal_id, jti
)
INSERT INTO entity_history (internal_id, domain_id, kind, status, details)
SELECT internal_id, domain_id, 'set', 'skipped', jsonb_build_object('event', id, 'jti', jti)
FROM skipped

-- name: events_sent
UPDATE security_events SET state = 'sent', sent_at = coalesce(sent_at, now())
WHERE domain_id = $1 AND id = ANY ($2::bigint[]) AND state = 'pending'

-- name: events_acknowledged
-- The domain acknowledged these SETs (by jti): they never return.
-- Each goes into its entity's history (in the same statement).
WITH acknowledged AS (
    UPDATE security_events SET state = 'acknowledged', settled_at = now()
    WHERE domain_id = $1 AND jti = ANY ($2::text[]) AND state IN ('pending', 'sent')
    RETURNING id, domain_id, internal_id, jti
), history AS (
    INSERT INTO entity_history (internal_id, domain_id, kind, status, details)
    SELECT internal_id, domain_id, 'set', 'acknowledged', jsonb_build_object('event', id, 'jti', jti)
    FROM acknowledged
)
SELECT jti FROM acknowledged

-- name: events_refused
-- The domain reported an error for these SETs ($2: [{jti, err, description}]): kept with it.
WITH refused AS (
    UPDATE security_events v SET state = 'failed', settled_at = now(),
        error = jsonb_build_object('err', x.err, 'description', x.description)
    FROM jsonb_to_recordset($2::jsonb) AS x (jti text, err text, description text)
    WHERE v.domain_id = $1 AND v.jti = x.jti AND v.state IN ('pending', 'sent')
    RETURNING v.id, v.domain_id, v.internal_id, v.jti, v.error
), history AS (
    INSERT INTO entity_history (internal_id, domain_id, kind, status, details)
    SELECT internal_id, domain_id, 'set', 'failed',
           jsonb_build_object('event', id, 'jti', jti, 'answer', error)
    FROM refused
)
SELECT jti FROM refused

-- name: event_failed
WITH failed AS (
    UPDATE security_events SET state = 'failed', settled_at = now(), error = $3
    WHERE domain_id = $1 AND id = $2 AND state IN ('pending', 'sent')
    RETURNING id, domain_id, internal_id, jti, error
)
INSERT INTO entity_history (internal_id, domain_id, kind, status, details)
SELECT internal_id, domain_id, 'set', 'failed',
       jsonb_build_object('event', id, 'jti', jti, 'answer', error)
FROM failed

-- name: more_events
SELECT EXISTS (
    SELECT 1 FROM security_events WHERE domain_id = $1 AND state IN ('pending', 'sent') AND id > $2
)

-- name: subscription
SELECT domain_id, resource_types, attributes, delivery, endpoint, credential_ref, detail,
       identity_events, created_at, updated_at
FROM event_subscriptions WHERE domain_id = $1

-- name: subscriptions
SELECT domain_id, resource_types, attributes, delivery, endpoint, credential_ref, detail,
       identity_events, created_at, updated_at
FROM event_subscriptions ORDER BY domain_id

-- name: subscribe
INSERT INTO event_subscriptions (domain_id, resource_types, attributes, delivery, endpoint,
                                 credential_ref, detail, identity_events)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (domain_id) DO UPDATE SET
    resource_types = EXCLUDED.resource_types, attributes = EXCLUDED.attributes,
    delivery = EXCLUDED.delivery, endpoint = EXCLUDED.endpoint,
    credential_ref = EXCLUDED.credential_ref, detail = EXCLUDED.detail,
    identity_events = EXCLUDED.identity_events, updated_at = now()
RETURNING domain_id, resource_types, attributes, delivery, endpoint, credential_ref, detail,
          identity_events, created_at, updated_at

-- name: unsubscribe
-- No more SETs for the domain; those not yet delivered are dropped with their pushes.
WITH dropped AS (
    UPDATE security_events SET state = 'skipped', settled_at = now()
    WHERE domain_id = $1 AND state = 'pending'
), pushes AS (
    UPDATE outbox SET state = 'cancelled', updated_at = now()
    WHERE domain_id = $1 AND kind = 'set' AND state IN ('pending', 'in_flight')
)
DELETE FROM event_subscriptions WHERE domain_id = $1 RETURNING domain_id

-- name: event_stats
SELECT domain_id, state, count(*) AS events
FROM security_events
GROUP BY domain_id, state ORDER BY domain_id, state

-- name: unsettled_event_stats
-- For /metrics: what waits for each domain (read through the partial index only).
SELECT domain_id, state, count(*) AS events
FROM security_events WHERE state IN ('pending', 'sent')
GROUP BY domain_id, state ORDER BY domain_id, state

-- name: newest_signing_key
SELECT kid, private_key FROM signing_keys ORDER BY created_at DESC, kid DESC LIMIT 1

-- name: add_signing_key
INSERT INTO signing_keys (kid, private_key, public_jwk) VALUES ($1, $2, $3)

-- name: published_keys
-- The newest key, and every older one that signed a SET that may still be pending.
SELECT k.kid, k.public_jwk, k.created_at,
       k.kid = (SELECT kid FROM signing_keys ORDER BY created_at DESC, kid DESC LIMIT 1) AS signing,
       (SELECT count(*) FROM security_events v WHERE v.kid = k.kid AND v.state IN ('pending', 'sent'))
           AS unsettled
FROM signing_keys k
ORDER BY k.created_at DESC, k.kid DESC

-- name: lock_signing_keys
SELECT pg_advisory_xact_lock(hashtext('broker_signing_keys'))

-- name: events_subscribed
SELECT EXISTS (SELECT 1 FROM event_subscriptions)

-- name: subscription_exists
SELECT EXISTS (SELECT 1 FROM event_subscriptions WHERE domain_id = $1)

-- name: record_identity_notices
-- Merge and split notices ($1: [{internal_id, kind, document}], document naming the domain),
-- each for its domain if it subscribes to them; a push delivery for each pushed one.
WITH incoming AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb) AS x (internal_id text, kind text, document jsonb)
), changes AS (
    INSERT INTO home_changes (txn, internal_id, kinds, document)
    SELECT gen_random_uuid(), i.internal_id, ARRAY[i.kind], i.document
    FROM incoming i
    WHERE EXISTS (SELECT 1 FROM event_subscriptions s
                  WHERE s.domain_id = i.document ->> 'domain' AND s.identity_events)
    RETURNING id, internal_id, document
), events AS (
    INSERT INTO security_events (domain_id, change_id, internal_id, jti)
    SELECT c.document ->> 'domain', c.id, c.internal_id, gen_random_uuid()::text
    FROM changes c
    ORDER BY c.id
    RETURNING id, domain_id, internal_id
)
INSERT INTO outbox (domain_id, internal_id, kind, payload)
SELECT ev.domain_id, ev.internal_id, 'set', jsonb_build_object('event', ev.id)
FROM events ev JOIN event_subscriptions s ON s.domain_id = ev.domain_id
WHERE s.delivery = 'push'
ORDER BY ev.id

-- name: purge_settled_events
-- At most $2 SETs acknowledged (or skipped) more than $1 seconds ago, deleted. Pending, sent and
-- failed ones stay, whatever their age: a domain has yet to take them, or a person to look.
WITH old AS (
    SELECT id FROM security_events
    WHERE state IN ('acknowledged', 'skipped') AND settled_at < now() - make_interval(secs => $1)
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM security_events v USING old WHERE v.id = old.id

-- name: purge_home_changes
-- At most $2 home changes recorded more than $1 seconds ago that no SET names any more, deleted.
-- The last change with a document of each entity stays: the next change is compared with it
-- (previous_documents).
WITH old AS (
    SELECT c.id FROM home_changes c
    WHERE c.at < now() - make_interval(secs => $1)
      AND NOT EXISTS (SELECT 1 FROM security_events v WHERE v.change_id = c.id)
      AND (c.document IS NULL OR c.kinds && ARRAY['merge', 'split']
           OR EXISTS (SELECT 1 FROM home_changes n
                      WHERE n.internal_id = c.internal_id AND n.id > c.id
                        AND n.document IS NOT NULL AND NOT n.kinds && ARRAY['merge', 'split']))
    LIMIT $2
    FOR UPDATE OF c SKIP LOCKED
)
DELETE FROM home_changes c USING old WHERE c.id = old.id
