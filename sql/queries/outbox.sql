-- Named queries of propagation (broker/propagation/): the outbox, peer copies, the home poller.

-- name: enqueue_sync
-- A sync of each entity ($1) toward every push peer except the one the change came from ($2).
-- A disabled peer gets its syncs too: they wait until it is enabled (push_peers leaves it out).
-- An entity that already has a pending sync toward a peer gets no second one (DO NOTHING takes
-- no lock on it: concurrent writes of one entity do not queue behind each other).
INSERT INTO outbox (domain_id, internal_id, kind)
SELECT d.id, e.internal_id, 'sync'
FROM domains d
CROSS JOIN unnest($1::text[]) AS e(internal_id)
WHERE d.kind = 'peer' AND d.push AND d.status <> 'removed' AND d.id IS DISTINCT FROM $2
ORDER BY e.internal_id, d.id
ON CONFLICT (domain_id, internal_id) WHERE state = 'pending' AND kind = 'sync' DO NOTHING

-- name: enqueue_sync_sealed
-- The same, for writes that set write-only values ($3, aligned with $1): the sync carries them
-- sealed, and newer values replace what a waiting sync carries.
INSERT INTO outbox (domain_id, internal_id, kind, sealed_values)
SELECT d.id, e.internal_id, 'sync', e.sealed
FROM domains d
CROSS JOIN unnest($1::text[], $3::bytea[]) AS e(internal_id, sealed)
WHERE d.kind = 'peer' AND d.push AND d.status <> 'removed' AND d.id IS DISTINCT FROM $2
ORDER BY e.internal_id, d.id
ON CONFLICT (domain_id, internal_id) WHERE state = 'pending' AND kind = 'sync'
DO UPDATE SET sealed_values = EXCLUDED.sealed_values, updated_at = now()

-- name: enqueue_sync_to
-- A sync of entities ($2) toward one peer ($1), due at $3.
INSERT INTO outbox (domain_id, internal_id, kind, next_attempt_at)
SELECT $1, e.internal_id, 'sync', $3
FROM unnest($2::text[]) AS e(internal_id)
ON CONFLICT (domain_id, internal_id) WHERE state = 'pending' AND kind = 'sync' DO NOTHING

-- name: enqueue_provision
-- Entities ($2) needed in peer $1 now (a group names them): created there even if held back.
INSERT INTO outbox (domain_id, internal_id, kind)
SELECT $1, e.internal_id, 'provision'
FROM unnest($2::text[]) AS e(internal_id)

-- name: claim_deliveries
-- Up to $3 deliveries toward peer $1 that are due, each the oldest unfinished one of its entity
-- (order per peer and entity), claimed by worker $2 for a lease of $4 seconds. A claim whose
-- lease ran out (its worker died) is claimed again. A merge's clean-up of the survivor also
-- waits for what is unfinished about the entities merged into it (a create in flight for a
-- loser is finished, or found cancelled, before its alias is deleted).
WITH ready AS (
    SELECT o.id
    FROM outbox o
    WHERE o.domain_id = $1
      AND ((o.state = 'pending' AND o.next_attempt_at <= now())
           OR (o.state = 'in_flight' AND o.lease_until < now()))
      -- The peer as it is now, not as the worker's list of peers (read up to a second ago)
      -- says: nothing is claimed toward a peer disabled since (evaluated once a statement).
      AND EXISTS (SELECT 1 FROM domains d WHERE d.id = $1 AND d.status NOT IN ('disabled', 'removed'))
      -- OFFSET 0 keeps this a per-row probe of outbox_by_entity: with statistics that saw an
      -- empty queue, the planner otherwise turns it into an anti-join of every pending row
      -- with every other (seconds per claim at a few thousand rows).
      AND NOT EXISTS (
          SELECT 1 FROM outbox e
          WHERE e.domain_id = o.domain_id AND e.internal_id = o.internal_id AND e.id < o.id
            AND e.state IN ('pending', 'in_flight')
          OFFSET 0
      )
      AND (o.kind NOT IN ('move_memberships', 'delete_alias') OR NOT EXISTS (
          SELECT 1 FROM outbox e JOIN entities x ON x.internal_id = e.internal_id
          WHERE x.merged_into = o.internal_id AND e.domain_id = o.domain_id AND e.id < o.id
            AND e.state IN ('pending', 'in_flight')
      ))
      -- An account handed over to this entity: what its previous owner had under way there
      -- lands first, so it cannot overwrite the new owner's state. Probed by entity from the
      -- (nearly always empty) list: a scan of every earlier row of the peer made each claim
      -- cost as much as the queue's length.
      AND NOT EXISTS (
          SELECT 1
          FROM jsonb_array_elements_text(o.payload -> 'after') AS a(internal_id)
          WHERE EXISTS (
              SELECT 1 FROM outbox e
              WHERE e.domain_id = o.domain_id AND e.internal_id = a.internal_id
                AND e.id < o.id AND e.state IN ('pending', 'in_flight')
              OFFSET 0
          )
      )
    ORDER BY o.id
    LIMIT $3
    FOR UPDATE OF o SKIP LOCKED
), claimed AS (
    -- By primary key, never a join: a generic plan (the prepared statement's, after five runs)
    -- does not know LIMIT $3, and then hash-joined the whole outbox (finished rows included)
    -- on every claim.
    UPDATE outbox o
    SET state = 'in_flight', claimed_by = $2, lease_until = now() + make_interval(secs => $4),
        updated_at = now()
    WHERE o.id = ANY (ARRAY(SELECT id FROM ready))
    RETURNING o.id, o.domain_id, o.internal_id, o.attempts, o.sealed_values, o.kind, o.payload,
              o.operation_id, o.last_error
)
-- With each claim, what entity_for_delivery would read right after it (one statement for the
-- claim's rows instead of one each): the entity (NULL for a kind that names none), its primary
-- row in the peer and what the peer last received.
-- Each read is a lateral probe by key (LIMIT keeps it one): as joins, with the statistics of
-- tables that were empty, the planner scanned id_mappings and peer_copies whole for every claim
-- (about 1,000 buffers and 10 to 30 ms a claim, three quarters of PostgreSQL's time per
-- delivery in bench/deliveries.py).
SELECT c.*, e.resource_type, e.state AS entity_state, e.merged_into, e.provision_on_demand,
       -- OFFSET 0: a probe per row, never a hashed scan of the peer's every mapping row.
       EXISTS (SELECT 1 FROM id_mappings k WHERE k.internal_id = c.internal_id AND k.domain_id = $1
               OFFSET 0) AS known_here,
       m.external_id, m.state AS mapping_state, m.correlation_handle,
       p.document AS copy, p.copy_version, p.suspended_at
FROM claimed c
LEFT JOIN LATERAL (
    SELECT e.resource_type, e.state, e.merged_into, e.provision_on_demand
    FROM entities e WHERE e.internal_id = c.internal_id LIMIT 1
) e ON true
LEFT JOIN LATERAL (
    SELECT m.external_id, m.state, m.correlation_handle
    FROM id_mappings m
    WHERE m.internal_id = c.internal_id AND m.domain_id = $1 AND m.is_primary
    LIMIT 1
) m ON true
LEFT JOIN LATERAL (
    SELECT p.document, p.xmin AS copy_version, p.suspended_at
    FROM peer_copies p WHERE p.internal_id = c.internal_id AND p.domain_id = $1 LIMIT 1
) p ON true
ORDER BY c.id

-- name: claim_riders
-- The deliveries of entities ($2) that other lanes just claimed, toward peers ($1) with room to
-- take them along (at most $3[i] toward peer $1[i]), claimed by worker $4 for a lease of $5
-- seconds. Each is the oldest unfinished row of its (peer, entity), a sync or a provision that is
-- due, with no handover still under way (the rules of claim_deliveries). They start with the
-- rows claimed, so that one read of home serves a change toward every peer.
-- Each (peer, entity) is probed by itself, through laterals that LIMIT and FOR UPDATE keep from
-- being flattened: with the statistics of a queue that was empty, the planner otherwise walked
-- every pending row of the outbox once per pair, or a whole index per row (seconds per claim).
WITH candidate AS MATERIALIZED (
    SELECT o.id, o.domain_id, p.room
    FROM unnest($1::text[], $3::int[]) AS p(domain_id, room)
    -- Only peers not disabled meanwhile (see claim_deliveries).
    JOIN domains d ON d.id = p.domain_id AND d.status NOT IN ('disabled', 'removed')
    CROSS JOIN unnest($2::text[]) AS w(internal_id)
    -- The pair's oldest unfinished row, read from outbox_by_entity as the first entry at or
    -- after (peer, entity) in its order: the row belongs to the pair only if the next lateral
    -- finds it with the pair's peer and entity. Asked as equalities, the question let a plan
    -- kept from a small queue walk the peer's whole claim order instead, filtering on the
    -- entity (about 600 buffers a statement).
    CROSS JOIN LATERAL (
        SELECT f.id FROM outbox f
        WHERE (f.domain_id, f.internal_id) >= (p.domain_id, w.internal_id)
          AND f.state IN ('pending', 'in_flight')
        ORDER BY f.domain_id, f.internal_id, f.id
        LIMIT 1
    ) first
    -- Locked here, row by row (a window and FOR UPDATE cannot share a level): a row another
    -- worker holds is skipped, one it claimed meanwhile is found no longer pending. A row
    -- locked but past the lane's room is left as it was.
    CROSS JOIN LATERAL (
        SELECT o.id, o.domain_id
        FROM outbox o
        WHERE o.domain_id = p.domain_id AND o.internal_id = w.internal_id AND o.id = first.id
          AND o.state = 'pending' AND o.next_attempt_at <= now()
          AND o.kind IN ('sync', 'provision')
          AND NOT EXISTS (
              SELECT 1
              FROM jsonb_array_elements_text(o.payload -> 'after') AS a(internal_id)
              WHERE EXISTS (
                  SELECT 1 FROM outbox e
                  WHERE e.domain_id = o.domain_id AND e.internal_id = a.internal_id
                    AND e.id < o.id AND e.state IN ('pending', 'in_flight')
                  OFFSET 0
              )
          )
        FOR UPDATE OF o SKIP LOCKED
    ) o
), ready AS (
    SELECT id
    FROM (SELECT id, room, row_number() OVER (PARTITION BY domain_id ORDER BY id) AS rank
          FROM candidate) ranked
    WHERE rank <= room
), claimed AS (
    UPDATE outbox o
    SET state = 'in_flight', claimed_by = $4, lease_until = now() + make_interval(secs => $5),
        updated_at = now()
    WHERE o.id = ANY (ARRAY(SELECT id FROM ready))
    RETURNING o.id, o.domain_id, o.internal_id, o.attempts, o.sealed_values, o.kind, o.payload,
              o.operation_id, o.last_error
)
-- What claim_deliveries reads with each row.
SELECT c.*, e.resource_type, e.state AS entity_state, e.merged_into, e.provision_on_demand,
       EXISTS (SELECT 1 FROM id_mappings k
               WHERE k.internal_id = c.internal_id AND k.domain_id = c.domain_id OFFSET 0)
           AS known_here,
       m.external_id, m.state AS mapping_state, m.correlation_handle,
       p.document AS copy, p.copy_version, p.suspended_at
FROM claimed c
LEFT JOIN LATERAL (
    SELECT e.resource_type, e.state, e.merged_into, e.provision_on_demand
    FROM entities e WHERE e.internal_id = c.internal_id LIMIT 1
) e ON true
LEFT JOIN LATERAL (
    SELECT m.external_id, m.state, m.correlation_handle
    FROM id_mappings m
    WHERE m.internal_id = c.internal_id AND m.domain_id = c.domain_id AND m.is_primary
    LIMIT 1
) m ON true
LEFT JOIN LATERAL (
    SELECT p.document, p.xmin AS copy_version, p.suspended_at
    FROM peer_copies p WHERE p.internal_id = c.internal_id AND p.domain_id = c.domain_id LIMIT 1
) p ON true
ORDER BY c.id

-- name: deliveries_done
-- Deliveries ($1, one or several) claimed by worker $2 delivered: write-only values are erased;
-- each entity's history keeps it (same statement).
WITH settled AS (
    UPDATE outbox
    SET state = 'done', attempts = attempts + 1, lease_until = NULL, last_error = NULL,
        sealed_values = NULL, updated_at = now()
    WHERE id = ANY($1::bigint[]) AND claimed_by = $2 AND state = 'in_flight'
    RETURNING id, domain_id, internal_id, kind, attempts, operation_id
)
INSERT INTO entity_history (internal_id, domain_id, kind, status, details)
SELECT internal_id, domain_id, 'delivery', 'done',
       jsonb_build_object('delivery', id, 'task', kind, 'attempts', attempts,
                          'operation', operation_id)
FROM settled
WHERE internal_id IS NOT NULL  -- an orphan's deletion (delete_orphan) is no entity's

-- name: delivery_later
-- Back to pending, due at $3 ($4: count it as an attempt). A newer pending sync of the same
-- entity is folded into this one (a sync delivers home's state when it runs), and its newer
-- write-only values move with it. The fold must be complete before this row becomes pending
-- again (one pending sync per entity): reading its sorted output in SET makes it so.
WITH folded AS (
    UPDATE outbox f SET state = 'cancelled', sealed_values = NULL, updated_at = now()
    FROM outbox o, outbox before
    WHERE o.id = $1 AND o.kind = 'sync' AND f.kind = 'sync' AND f.state = 'pending'
      AND f.domain_id = o.domain_id AND f.internal_id = o.internal_id AND f.id <> o.id
      AND before.id = f.id
    RETURNING f.id, before.sealed_values
), settled AS (
    UPDATE outbox
    SET state = 'pending', attempts = attempts + CASE WHEN $4::boolean THEN 1 ELSE 0 END,
        next_attempt_at = $3, lease_until = NULL, last_error = $5, updated_at = now(),
        sealed_values = coalesce(
            (SELECT sealed_values FROM folded WHERE sealed_values IS NOT NULL
             ORDER BY id DESC LIMIT 1),
            sealed_values)
    WHERE id = $1 AND claimed_by = $2 AND state = 'in_flight'
    RETURNING id, domain_id, internal_id, kind, attempts, operation_id, last_error
)
-- A failed attempt (counted, $4) goes into the entity's history with the peer's answer; a
-- delivery only waiting (for its dependencies) does not.
INSERT INTO entity_history (internal_id, domain_id, kind, status, details)
SELECT internal_id, domain_id, 'delivery', 'retry',
       jsonb_build_object('delivery', id, 'task', kind, 'attempts', attempts,
                          'operation', operation_id, 'answer', last_error, 'due', $3::timestamptz)
FROM settled WHERE $4::boolean AND internal_id IS NOT NULL

-- name: delivery_dead
WITH settled AS (
    UPDATE outbox
    SET state = 'dead', attempts = attempts + 1, lease_until = NULL, last_error = $3,
        updated_at = now()
    WHERE id = $1 AND claimed_by = $2 AND state = 'in_flight'
    RETURNING id, domain_id, internal_id, kind, attempts, operation_id, last_error
)
INSERT INTO entity_history (internal_id, domain_id, kind, status, details)
SELECT internal_id, domain_id, 'delivery', 'dead',
       jsonb_build_object('delivery', id, 'task', kind, 'attempts', attempts,
                          'operation', operation_id, 'answer', last_error)
FROM settled
WHERE internal_id IS NOT NULL

-- name: domain_delivered
-- A delivery succeeded: the peer is healthy. Returns whether it recovers from a failure that
-- lasted (its queue is then released); writes at most once a second while all is well.
WITH before AS (SELECT status, failing_since FROM domains WHERE id = $1)
UPDATE domains d
SET failing_since = NULL, last_delivery_at = now(),
    status = CASE WHEN d.status = 'quarantined' THEN 'active' ELSE d.status END,
    updated_at = now()
FROM before
WHERE d.id = $1 AND (d.failing_since IS NOT NULL OR d.status = 'quarantined'
                     OR d.last_delivery_at IS NULL OR d.last_delivery_at < now() - interval '1 second')
RETURNING before.status = 'quarantined' OR before.failing_since < now() - interval '5 seconds'
    AS recovered

-- name: domain_failed
-- A delivery failed in a way that may pass: the peer is failing since the first such failure,
-- and quarantined once that is longer ago than $2 seconds.
UPDATE domains
SET failing_since = coalesce(failing_since, now()),
    status = CASE
        WHEN status = 'active' AND coalesce(failing_since, now()) < now() - make_interval(secs => $2)
        THEN 'quarantined' ELSE status END,
    updated_at = now()
WHERE id = $1
RETURNING status, failing_since

-- name: release_queue
-- A peer left quarantine: whatever waits for it is due now, and drains in order.
UPDATE outbox SET next_attempt_at = now(), updated_at = now()
WHERE domain_id = $1 AND state = 'pending' AND next_attempt_at > now()

-- name: push_peers
-- Domains the worker delivers to: push peers (SCIM), and domains whose SETs are pushed.
SELECT d.id, d.scim_url, d.credential_ref, d.scope_filter, d.attribute_policy, d.status,
       d.deprovision, d.suspend_for, d.on_conflict,
       s.endpoint AS events_endpoint, s.credential_ref AS events_credential
FROM domains d
LEFT JOIN event_subscriptions s ON s.domain_id = d.id AND s.delivery = 'push'
WHERE d.kind = 'peer' AND (d.push OR s.endpoint IS NOT NULL) AND d.status NOT IN ('disabled', 'removed')
ORDER BY d.id

-- name: entity_for_delivery
-- The entity, its primary row in the peer, and what the peer last received (copy_version: the
-- transaction that wrote it, which save_copy_of checks).
SELECT e.internal_id, e.resource_type, e.state, e.merged_into, e.provision_on_demand,
       EXISTS (SELECT 1 FROM id_mappings k WHERE k.internal_id = e.internal_id AND k.domain_id = $1)
           AS known_here,
       m.external_id, m.state AS mapping_state, m.correlation_handle,
       c.document AS copy, c.xmin AS copy_version, c.suspended_at
FROM entities e
LEFT JOIN id_mappings m ON m.internal_id = e.internal_id AND m.domain_id = $1 AND m.is_primary
LEFT JOIN peer_copies c ON c.internal_id = e.internal_id AND c.domain_id = $1
WHERE e.internal_id = $2

-- name: peer_ids
-- The peer's primary IDs of entities ($2), merged ones as their survivors (target: the entity
-- whose account it is); for those without one, whether a delivery toward the peer is still to
-- come (waiting) or was made (tried). For a split-off held back until needed, only a
-- provisioning counts as tried.
SELECT w.internal_id, coalesce(e.merged_into, w.internal_id) AS target, m.external_id,
       EXISTS (SELECT 1 FROM outbox o
               WHERE o.domain_id = $1 AND o.internal_id = coalesce(e.merged_into, w.internal_id)
                 AND o.state IN ('pending', 'in_flight')) AS waiting,
       EXISTS (SELECT 1 FROM outbox o
               WHERE o.domain_id = $1 AND o.internal_id = coalesce(e.merged_into, w.internal_id)
                 AND o.state IN ('done', 'dead', 'cancelled')
                 AND (o.kind = 'provision' OR NOT coalesce(e.provision_on_demand, false))) AS tried
FROM unnest($2::text[]) AS w(internal_id)
LEFT JOIN entities e ON e.internal_id = w.internal_id
LEFT JOIN id_mappings m
  ON m.internal_id = coalesce(e.merged_into, w.internal_id) AND m.domain_id = $1
 AND m.is_primary AND m.state = 'active'

-- name: pending_handle
SELECT correlation_handle, state FROM id_mappings
WHERE internal_id = $1 AND domain_id = $2 AND is_primary

-- name: create_state
SELECT state FROM id_mappings WHERE correlation_handle = $1 AND domain_id = $2 AND is_primary

-- name: save_copy
INSERT INTO peer_copies (domain_id, internal_id, document, suspended_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT (domain_id, internal_id)
DO UPDATE SET document = EXCLUDED.document, suspended_at = EXCLUDED.suspended_at, updated_at = now()

-- name: save_copy_of
-- What account $5 of peer $1 received, recorded as entity $2's copy only if $5 is still that
-- entity's primary there (a merge or split may have handed the account over meanwhile: then the
-- new owner's sync brings it to its state, from no copy, with a PUT), and only if the copy is
-- still the one the write was computed from ($6: its copy_version; NULL: there was none).
-- Returns false when the copy changed meanwhile: something else wrote to the account while the
-- write was on its way (a merge's membership move, a value parked aside), so what the peer holds
-- now is not known.
WITH mine AS (
    SELECT EXISTS (SELECT 1 FROM id_mappings
                   WHERE domain_id = $1 AND internal_id = $2 AND external_id = $5 AND is_primary)
        AS held
), updated AS (
    UPDATE peer_copies
    SET document = $3, suspended_at = $4, updated_at = now()
    WHERE domain_id = $1 AND internal_id = $2 AND xmin = $6::xid AND (SELECT held FROM mine)
    RETURNING 1
), inserted AS (
    INSERT INTO peer_copies (domain_id, internal_id, document, suspended_at)
    SELECT $1, $2, $3, $4
    WHERE $6::xid IS NULL AND (SELECT held FROM mine)
    ON CONFLICT (domain_id, internal_id) DO NOTHING
    RETURNING 1
)
SELECT NOT (SELECT held FROM mine) OR EXISTS (SELECT 1 FROM updated)
       OR EXISTS (SELECT 1 FROM inserted)

-- name: save_copies
-- What several accounts just created received (peers $1[i], entities $2[i], documents $3[i],
-- JSON text), as save_copy records one.
INSERT INTO peer_copies (domain_id, internal_id, document, suspended_at)
SELECT i.domain_id, i.internal_id, i.document::jsonb, NULL
FROM unnest($1::text[], $2::text[], $3::text[]) AS i(domain_id, internal_id, document)
ON CONFLICT (domain_id, internal_id)
DO UPDATE SET document = EXCLUDED.document, suspended_at = NULL, updated_at = now()

-- name: save_copies_of
-- save_copy_of for several deliveries at once (peers $1[i], entities $2[i], documents $3[i] as
-- JSON text, accounts $4[i], copy versions $5[i]): the entities (peer, entity) whose copy was
-- NOT recorded because it changed meanwhile. The (peer, entity) pairs are distinct (one delivery
-- of an entity to a peer is under way at a time).
WITH input AS (
    SELECT i.*, EXISTS (SELECT 1 FROM id_mappings m
                        WHERE m.domain_id = i.domain_id AND m.internal_id = i.internal_id
                          AND m.external_id = i.external_id AND m.is_primary) AS held
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::xid[])
        AS i(domain_id, internal_id, document, external_id, version)
), updated AS (
    UPDATE peer_copies c
    SET document = i.document::jsonb, suspended_at = NULL, updated_at = now()
    FROM input i
    WHERE c.domain_id = i.domain_id AND c.internal_id = i.internal_id AND c.xmin = i.version
      AND i.held
    RETURNING c.domain_id, c.internal_id
), inserted AS (
    INSERT INTO peer_copies (domain_id, internal_id, document, suspended_at)
    SELECT i.domain_id, i.internal_id, i.document::jsonb, NULL
    FROM input i
    WHERE i.version IS NULL AND i.held
    ON CONFLICT (domain_id, internal_id) DO NOTHING
    RETURNING domain_id, internal_id
)
SELECT i.domain_id, i.internal_id
FROM input i
WHERE i.held
  AND NOT EXISTS (SELECT 1 FROM updated u
                  WHERE u.domain_id = i.domain_id AND u.internal_id = i.internal_id)
  AND NOT EXISTS (SELECT 1 FROM inserted n
                  WHERE n.domain_id = i.domain_id AND n.internal_id = i.internal_id)

-- name: drop_copy
DELETE FROM peer_copies WHERE domain_id = $1 AND internal_id = $2

-- name: forget_copy
-- What peer $1 holds of entity $2 is not known any more (something else wrote to its account):
-- the copy becomes JSON null (the next sync sends the whole resource, a PUT) instead of going,
-- so a write of the entity on its way, computed from no copy, finds on recording (save_copy_of)
-- that it changed; a deleted copy would look as if there never was one.
INSERT INTO peer_copies (domain_id, internal_id, document)
VALUES ($1, $2, 'null'::jsonb)
ON CONFLICT (domain_id, internal_id) DO UPDATE SET document = 'null'::jsonb, updated_at = now()

-- name: queue_stats
-- A peer's queue as the admin API shows it.
SELECT d.id, d.status, d.failing_since, d.last_delivery_at,
       count(*) FILTER (WHERE o.state IN ('pending', 'in_flight')) AS depth,
       count(*) FILTER (WHERE o.state = 'in_flight') AS in_flight,
       count(*) FILTER (WHERE o.state = 'dead') AS dead,
       extract(epoch FROM now() - min(o.created_at) FILTER (WHERE o.state IN ('pending', 'in_flight')))
           AS oldest_age_seconds,
       count(*) FILTER (WHERE o.state = 'done' AND o.updated_at > now() - interval '60 seconds')
           AS delivered_last_minute
FROM domains d
LEFT JOIN outbox o ON o.domain_id = d.id
WHERE d.id = $1
GROUP BY d.id

-- name: all_queue_stats
SELECT d.id,
       count(o.id) FILTER (WHERE o.state IN ('pending', 'in_flight')) AS depth,
       count(o.id) FILTER (WHERE o.state = 'dead') AS dead,
       coalesce(extract(epoch FROM now() - min(o.created_at)
           FILTER (WHERE o.state IN ('pending', 'in_flight'))), 0) AS oldest_age_seconds,
       d.status = 'quarantined' AS quarantined
FROM domains d
LEFT JOIN outbox o ON o.domain_id = d.id AND o.state IN ('pending', 'in_flight', 'dead')
WHERE d.kind = 'peer' AND d.push
GROUP BY d.id
ORDER BY d.id

-- name: list_deliveries
SELECT id, domain_id, internal_id, operation_id, kind, state, attempts, next_attempt_at,
       last_error, created_at, updated_at
FROM outbox
WHERE ($1::text IS NULL OR domain_id = $1) AND ($2::text IS NULL OR state = $2)
ORDER BY id
LIMIT $3

-- name: retry_delivery
-- A dead delivery goes back to the queue, due now, with its attempts counted afresh (a pushed
-- SET the receiver refused is to be sent again).
WITH retried AS (
    UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()
    WHERE id = $1 AND state = 'dead'
    RETURNING id, kind, payload, domain_id
), resent AS (
    UPDATE security_events v SET state = 'pending', error = NULL, settled_at = NULL
    FROM retried r
    WHERE r.kind = 'set' AND v.id = (r.payload ->> 'event')::bigint AND v.domain_id = r.domain_id
      AND v.state = 'failed'
)
SELECT id FROM retried

-- name: discard_delivery
UPDATE outbox
SET state = 'cancelled', sealed_values = NULL, updated_at = now(),
    last_error = coalesce(last_error, '{}'::jsonb) || jsonb_build_object('discarded_by', $2::text)
WHERE id = $1 AND state = 'dead'
RETURNING id

-- name: delivery_by_id
SELECT id, domain_id, internal_id, operation_id, kind, state, attempts, next_attempt_at,
       last_error, created_at, updated_at
FROM outbox WHERE id = $1

-- name: watermark
SELECT last_modified, seen_at_mark, swept_at FROM home_watermarks WHERE resource_type = $1

-- name: save_watermark
INSERT INTO home_watermarks (resource_type, last_modified, seen_at_mark)
VALUES ($1, $2, $3)
ON CONFLICT (resource_type)
DO UPDATE SET last_modified = EXCLUDED.last_modified, seen_at_mark = EXCLUDED.seen_at_mark

-- name: swept
UPDATE home_watermarks SET swept_at = now() WHERE resource_type = $1

-- name: live_entities
-- Entities of one type the broker holds as live (and knew before $2), for the sweep that finds
-- deletions in home.
SELECT internal_id FROM entities
WHERE resource_type = $1 AND state = 'active' AND created_at < $2
ORDER BY internal_id

-- name: alias_for_cleanup
-- The alias row a merge's clean-up acts on, if it still waits for its delete.
SELECT internal_id, state FROM id_mappings
WHERE domain_id = $1 AND external_id = $2 AND NOT is_primary AND state = 'deletion_required'

-- name: copies_naming
-- What peer $1 last received of groups whose members name $2 (to follow a membership move),
-- locked until the move is recorded: a group's sync recording its own copy meanwhile waits, and
-- then finds it changed.
SELECT internal_id, document FROM peer_copies
WHERE domain_id = $1 AND document -> 'members' @> jsonb_build_array(jsonb_build_object('value', $2::text))
ORDER BY internal_id
FOR UPDATE

-- name: resync_groups_moved
-- The broker's groups among accounts $2 of peer $1 that a membership move changed but whose
-- copies did not follow it (entities $3 did): the group's own sync recorded, meanwhile, what it
-- had written without the move. What the peer holds is not known: the copy goes, and the group
-- is synced again (a PUT).
WITH owners AS (
    SELECT internal_id FROM id_mappings
    WHERE domain_id = $1 AND external_id = ANY($2::text[]) AND is_primary
      AND internal_id <> ALL($3::text[])
), dropped AS (
    DELETE FROM peer_copies c
    USING owners o
    WHERE c.domain_id = $1 AND c.internal_id = o.internal_id
)
INSERT INTO outbox (domain_id, internal_id, kind)
SELECT $1, internal_id, 'sync' FROM owners
ON CONFLICT (domain_id, internal_id) WHERE state = 'pending' AND kind = 'sync' DO NOTHING

-- name: lock_operation
SELECT 1 FROM operations WHERE id = $1 FOR UPDATE

-- name: refresh_operation
-- An operation's progress per domain and its state, from its deliveries: done when every one
-- is done (or cancelled), failed when some are dead letters and none is left to run.
WITH per_domain AS (
    SELECT domain_id,
           count(*) AS tasks,
           count(*) FILTER (WHERE state IN ('done', 'cancelled')) AS finished,
           count(*) FILTER (WHERE state = 'dead') AS dead,
           (array_agg(last_error ->> 'reason' ORDER BY id DESC)
               FILTER (WHERE last_error IS NOT NULL AND state IN ('pending', 'dead')))[1] AS reason
    FROM outbox WHERE operation_id = $1
    GROUP BY domain_id
), summary AS (
    SELECT jsonb_object_agg(domain_id, jsonb_strip_nulls(jsonb_build_object(
               'state', CASE WHEN finished = tasks THEN 'done'
                             WHEN dead > 0 AND finished + dead = tasks THEN 'failed'
                             WHEN finished = 0 AND dead = 0 THEN 'pending'
                             ELSE 'propagating' END,
               'tasks', tasks, 'done', finished, 'reason', reason))) AS progress,
           coalesce(bool_and(finished = tasks), true) AS all_done,
           coalesce(bool_or(dead > 0), false) AND coalesce(bool_and(finished + dead = tasks), true)
               AS stuck
    FROM per_domain
)
UPDATE operations o
SET progress = coalesce(s.progress, '{}'::jsonb),
    state = CASE WHEN s.all_done THEN 'done' WHEN s.stuck THEN 'failed' ELSE 'propagating' END,
    updated_at = now()
FROM summary s
WHERE o.id = $1 AND o.state <> 'pending'

-- name: account_owner
-- The entity whose primary account $2 of peer $1 is (after an alias's delete: the entity it
-- became the primary of again while the delete was on its way, which must be created anew).
SELECT internal_id FROM id_mappings WHERE domain_id = $1 AND external_id = $2 AND is_primary

-- name: broker_account
-- Whether account $2 of peer $1 is one of the broker's: some entity's primary there, or an alias
-- a merge left waiting for its delete (it holds its values until then).
SELECT EXISTS (SELECT 1 FROM id_mappings
               WHERE domain_id = $1 AND external_id = $2
                 AND (is_primary OR state = 'deletion_required'))

-- name: share_entities
-- Entities ($1) a delivery wrote or named, share-locked until it has recorded what it wrote: a
-- merge or split of them (lock_entities) finishes before, or waits and then sees the record.
SELECT internal_id FROM entities
WHERE internal_id = ANY($1::text[])
ORDER BY internal_id
FOR SHARE

-- name: share_accounts
-- The rows of the accounts ($2) of peer $1 a delivery named, share-locked the same way (a
-- deprovision or an alias's delete retires them).
SELECT id FROM id_mappings
WHERE domain_id = $1 AND external_id = ANY($2::text[])
ORDER BY id
FOR SHARE

-- name: references_moved
-- Whether a reference a delivery just sent to peer $1 (entity $2[i] as account $3[i]) translates
-- to something else now: the entity was merged, or its account handed over, retired or deleted.
SELECT EXISTS (
    SELECT 1
    FROM unnest($2::text[], $3::text[]) AS r(internal_id, external_id)
    LEFT JOIN entities e ON e.internal_id = r.internal_id
    WHERE NOT EXISTS (
        SELECT 1 FROM id_mappings m
        WHERE m.domain_id = $1 AND m.external_id = r.external_id AND m.is_primary
          AND m.state = 'active' AND m.internal_id = coalesce(e.merged_into, r.internal_id)
    )
)

-- name: mapped_account
SELECT EXISTS (SELECT 1 FROM id_mappings WHERE domain_id = $1 AND external_id = $2)

-- name: purge_finished
-- At most $2 finished deliveries (done, cancelled) last changed more than $1 seconds ago, deleted.
-- Those of an operation that is not done are kept: its progress is counted from its rows, and a
-- dead letter retried later counts them again.
WITH old AS (
    SELECT o.id
    FROM outbox o
    LEFT JOIN operations p ON p.id = o.operation_id
    WHERE o.state IN ('done', 'cancelled') AND o.updated_at < now() - make_interval(secs => $1)
      AND (o.operation_id IS NULL OR p.state = 'done')
    LIMIT $2
    FOR UPDATE OF o SKIP LOCKED
)
DELETE FROM outbox o USING old WHERE o.id = old.id

-- name: count_dead_letters
-- The dead letters toward peer $1 that died at or after $2 (NULL: whenever) and no later than
-- $3, and the database's clock (the $3 of the batches that settle them).
SELECT count(*) AS dead, now() AS as_of
FROM outbox
WHERE domain_id = $1 AND state = 'dead'
  AND ($2::timestamptz IS NULL OR updated_at >= $2) AND updated_at <= coalesce($3, now())

-- name: retry_dead_letters
-- At most $4 of the dead letters count_dead_letters counted ($1, $2, $3) queued again, due now,
-- attempts counted afresh (a pushed SET the receiver refused is to be sent again); their ids. A
-- letter that dies again meanwhile died after $3: it is not picked again. A sync delivers home's
-- state when it runs, and an entity has one pending sync per peer: a dead sync of an entity that
-- has one pending already (or a newer one in the batch) is superseded by it (cancelled, saying
-- so, and whether a password it carried is lost).
WITH picked AS (
    SELECT id FROM outbox
    WHERE domain_id = $1 AND state = 'dead'
      AND ($2::timestamptz IS NULL OR updated_at >= $2) AND updated_at <= $3
    ORDER BY id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), ranked AS (
    SELECT o.id,
           o.kind = 'sync' AND (
               row_number() OVER (PARTITION BY o.internal_id, o.kind ORDER BY o.id DESC) > 1
               OR EXISTS (SELECT 1 FROM outbox q
                          WHERE q.domain_id = o.domain_id AND q.internal_id = o.internal_id
                            AND q.kind = 'sync' AND q.state = 'pending')) AS superseded,
           o.sealed_values IS NOT NULL AS sealed
    FROM outbox o JOIN picked p ON p.id = o.id
), retried AS (
    UPDATE outbox o
    SET state = CASE WHEN r.superseded THEN 'cancelled' ELSE 'pending' END,
        attempts = CASE WHEN r.superseded THEN o.attempts ELSE 0 END,
        next_attempt_at = now(), updated_at = now(),
        sealed_values = CASE WHEN r.superseded THEN NULL ELSE o.sealed_values END,
        last_error = CASE WHEN r.superseded
                          THEN coalesce(o.last_error, '{}'::jsonb) || jsonb_build_object(
                               'superseded', CASE WHEN r.sealed
                                   THEN 'by a pending sync; the password it carried was not '
                                        || 'delivered: set it again'
                                   ELSE 'by a pending sync' END)
                          ELSE o.last_error END
    FROM ranked r
    WHERE o.id = r.id
    RETURNING o.id, o.kind, o.payload, o.domain_id, r.superseded, r.superseded AND r.sealed AS lost
), resent AS (
    UPDATE security_events v SET state = 'pending', error = NULL, settled_at = NULL
    FROM retried r
    WHERE r.kind = 'set' AND v.id = (r.payload ->> 'event')::bigint AND v.domain_id = r.domain_id
      AND v.state = 'failed'
)
SELECT id, superseded, lost FROM retried ORDER BY id

-- name: discard_dead_letters
-- At most $4 of the dead letters count_dead_letters counted ($1, $2, $3) given up by $5 (kept,
-- cancelled, their sealed values dropped); their ids.
WITH picked AS (
    SELECT id FROM outbox
    WHERE domain_id = $1 AND state = 'dead'
      AND ($2::timestamptz IS NULL OR updated_at >= $2) AND updated_at <= $3
    ORDER BY id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), discarded AS (
    UPDATE outbox o
    SET state = 'cancelled', sealed_values = NULL, updated_at = now(),
        last_error = coalesce(o.last_error, '{}'::jsonb)
                     || jsonb_build_object('discarded_by', $5::text)
    FROM picked p
    WHERE o.id = p.id
    RETURNING o.id
)
SELECT id FROM discarded ORDER BY id

-- name: provision_target
-- What provisioning entity $2 into peer $1 on demand starts from: the entity (NULL: unknown) and
-- its account there, if any.
SELECT e.state, e.merged_into, e.resource_type, m.external_id, m.state AS account_state
FROM entities e
LEFT JOIN id_mappings m ON m.internal_id = e.internal_id AND m.domain_id = $1 AND m.is_primary
WHERE e.internal_id = $2

-- name: enqueue_provision_now
-- A provisioning of entity $2 into peer $1 now (RFC 7642 section 2.3.4): one that is on its way
-- already serves, else a new one. Its outbox ID.
WITH waiting AS (
    SELECT id FROM outbox
    WHERE domain_id = $1 AND internal_id = $2 AND kind = 'provision'
      AND state IN ('pending', 'in_flight')
    ORDER BY id LIMIT 1
), added AS (
    INSERT INTO outbox (domain_id, internal_id, kind)
    SELECT $1, $2, 'provision' WHERE NOT EXISTS (SELECT 1 FROM waiting)
    RETURNING id
)
SELECT id FROM waiting UNION ALL SELECT id FROM added

-- name: provision_progress
-- How provisioning delivery $3 of entity $2 into peer $1 stands: the account, the delivery.
SELECT (SELECT external_id FROM id_mappings
        WHERE domain_id = $1 AND internal_id = $2 AND is_primary AND state = 'active') AS external_id,
       o.state, o.last_error
FROM outbox o WHERE o.id = $3
