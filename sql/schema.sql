-- The whole schema as the broker expects it, for reading: what applying every migration in order
-- yields. tests/test_migrations.py holds the two equal; a new migration updates this file too.
-- It is not itself a migration.

CREATE TABLE schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- Identity domains: one home (owns the internal IDs) and any number of peers.
CREATE TABLE domains (
    id                text PRIMARY KEY
                      CONSTRAINT domains_id_format CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    kind              text NOT NULL CONSTRAINT domains_kind_check CHECK (kind IN ('home', 'peer')),
    scim_url          text,
    -- Where the outbound credential lives (for example "env:PEER1_TOKEN"); never the secret itself.
    credential_ref    text,
    push              boolean NOT NULL DEFAULT false,
    scope_filter      text,
    -- Attribute policy: {"read": [...], "write": [...]}; a missing list means "all".
    attribute_policy  jsonb NOT NULL DEFAULT '{}'::jsonb,
    status            text NOT NULL DEFAULT 'active'
                      CONSTRAINT domains_status_check CHECK (status IN ('active', 'quarantined', 'disabled', 'removed')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    -- Push peers: delete at the peer when home deletes, or suspend (active false) for
    -- suspend_for first; a 409 on create links to the peer's resource or is dead-lettered.
    deprovision       text NOT NULL DEFAULT 'delete'
                      CONSTRAINT domains_deprovision_check CHECK (deprovision IN ('delete', 'suspend')),
    suspend_for       interval NOT NULL DEFAULT '30 days',
    on_conflict       text NOT NULL DEFAULT 'dead_letter'
                      CONSTRAINT domains_on_conflict_check CHECK (on_conflict IN ('link', 'dead_letter')),
    -- Set at the first failed delivery after a success, cleared by the next success.
    failing_since     timestamptz,
    last_delivery_at  timestamptz,
    -- Unlinkable (0010): meta.created, meta.lastModified and SET iat truncated to
    -- timestamp_precision seconds for this domain.
    unlinkable           boolean NOT NULL DEFAULT false,
    timestamp_precision  integer NOT NULL DEFAULT 1
                         CONSTRAINT domains_timestamp_precision_check
                         CHECK (timestamp_precision BETWEEN 1 AND 86400),
    CONSTRAINT domains_push_needs_url CHECK (NOT push OR scim_url IS NOT NULL)
);
-- There is one home.
CREATE UNIQUE INDEX domains_one_home ON domains ((true)) WHERE kind = 'home';

-- Bearer tokens a domain calls the broker with. Only a hash is stored.
CREATE TABLE domain_tokens (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    domain_id     text NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    token_hash    bytea NOT NULL CONSTRAINT domain_tokens_hash_unique UNIQUE,
    -- The first characters of the token, to tell tokens apart in listings.
    prefix        text NOT NULL,
    scopes        text[] NOT NULL DEFAULT ARRAY['scim:read', 'scim:write'],
    expires_at    timestamptz,
    revoked_at    timestamptz,
    last_used_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX domain_tokens_domain ON domain_tokens (domain_id);
-- The admin scope is the operator's: only tokens of the home domain hold it (0010).
-- 0018: console:read is the operator's too.
CREATE FUNCTION broker_admin_scope_is_home() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.scopes && ARRAY['admin', 'console:read']
       AND NOT EXISTS (SELECT 1 FROM domains WHERE id = NEW.domain_id AND kind = 'home') THEN
        RAISE EXCEPTION 'only a token of the home domain may hold the admin or console:read scope'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'domain_tokens_admin_is_home';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER domain_tokens_admin_is_home
    BEFORE INSERT OR UPDATE OF scopes, domain_id ON domain_tokens
    FOR EACH ROW EXECUTE FUNCTION broker_admin_scope_is_home();

-- Internal entities: the home's resources, named by the home's IDs (the internal IDs).
CREATE TABLE entities (
    internal_id    text COLLATE "C" PRIMARY KEY,
    resource_type  text NOT NULL,
    state          text NOT NULL DEFAULT 'active'
                   CONSTRAINT entities_state_check CHECK (state IN ('active', 'merged', 'deleted')),
    -- For a merged entity, the survivor it lives on in (always a live entity: merges re-point).
    merged_into    text COLLATE "C" REFERENCES entities (internal_id),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- A split-off held back from push peers until something needs it there (0006).
    provision_on_demand  boolean NOT NULL DEFAULT false,
    CONSTRAINT entities_merged_into_iff_merged CHECK ((state = 'merged') = (merged_into IS NOT NULL)),
    CONSTRAINT entities_not_merged_into_self CHECK (merged_into <> internal_id)
);
CREATE INDEX entities_merged_into ON entities (merged_into) WHERE merged_into IS NOT NULL;

-- The mapping table: internal ID <-> (domain, external ID, primary flag, state).
CREATE TABLE id_mappings (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- IDs compare as bytes (0020): opaque, only ever compared for equality.
    internal_id         text COLLATE "C" NOT NULL REFERENCES entities (internal_id),
    domain_id           text COLLATE "C" NOT NULL REFERENCES domains (id),
    -- NULL only while a create in a push peer is pending (the peer has not assigned it yet).
    external_id         text COLLATE "C",
    is_primary          boolean NOT NULL,
    -- peer: assigned by a push peer on create; minted: an opaque pairwise ID the broker issued.
    origin              text NOT NULL CONSTRAINT id_mappings_origin_check CHECK (origin IN ('peer', 'minted')),
    state               text NOT NULL DEFAULT 'active'
                        CONSTRAINT id_mappings_state_check
                        CHECK (state IN ('active', 'pending_create', 'deletion_required', 'retired')),
    -- The domain's own externalId for this entity: shown back to this domain only.
    domain_external_id  text COLLATE "C",
    -- Pairwise opaque correlation value sent as externalId when provisioning into a peer.
    correlation_handle  text COLLATE "C" NOT NULL,
    -- For retired aliases: when the row may be removed.
    retire_after        timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- The ID first, the domain second (0021): an index build sorts on the first key.
    CONSTRAINT id_mappings_external_id_unique UNIQUE (external_id, domain_id),
    CONSTRAINT id_mappings_correlation_unique UNIQUE (correlation_handle, domain_id),
    CONSTRAINT id_mappings_external_id_present CHECK ((external_id IS NULL) = (state = 'pending_create')),
    CONSTRAINT id_mappings_alias_state CHECK (is_primary = (state IN ('active', 'pending_create')))
);
-- At most one primary row per (entity, domain): outbound translation is unambiguous. An alias's
-- third key is NULL, and NULLs never clash (0020: one index where there were two). Outbound
-- lookups and merges read by entity through its first two columns, and the outbound look-up
-- reads what it needs of the table from the index alone (0022); inbound lookups use the unique
-- (external_id, domain_id).
CREATE UNIQUE INDEX id_mappings_one_primary
    ON id_mappings (internal_id, domain_id, (nullif(is_primary, false)))
    INCLUDE (is_primary, external_id, domain_external_id);

-- Merge and split operations: a status resource, idempotent by a client-supplied key.
CREATE TABLE operations (
    id               uuid PRIMARY KEY,
    kind             text NOT NULL CONSTRAINT operations_kind_check CHECK (kind IN ('merge', 'split', 'reconcile')),
    idempotency_key  text NOT NULL CONSTRAINT operations_idempotency_key_unique UNIQUE,
    request          jsonb NOT NULL,
    state            text NOT NULL DEFAULT 'pending'
                     CONSTRAINT operations_state_check
                     CHECK (state IN ('pending', 'propagating', 'done', 'failed')),
    -- Per-domain progress: {"D2": {"state": "...", "reason": "..."}}.
    progress         jsonb NOT NULL DEFAULT '{}'::jsonb,
    actor            text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- The durable outbox: work toward one domain about one entity, delivered in order per (domain, entity).
CREATE TABLE outbox (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    domain_id        text NOT NULL REFERENCES domains (id),
    -- NULL only for an orphan account a reconciliation deprovisions (0015).
    internal_id      text REFERENCES entities (internal_id),
    operation_id     uuid REFERENCES operations (id),
    kind             text NOT NULL,
    payload          jsonb NOT NULL DEFAULT '{}'::jsonb,
    state            text NOT NULL DEFAULT 'pending'
                     CONSTRAINT outbox_state_check
                     CHECK (state IN ('pending', 'in_flight', 'done', 'dead', 'cancelled')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    claimed_by       text,
    last_error       jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- Write-only attribute values (password) a sync delivers from the write itself: sealed with
    -- AES-256-GCM under a key kept outside the database, erased once delivered or discarded.
    sealed_values    bytea
);
CREATE INDEX outbox_by_entity ON outbox (domain_id, internal_id, id) WHERE state IN ('pending', 'in_flight');
CREATE INDEX outbox_by_operation ON outbox (operation_id) WHERE operation_id IS NOT NULL;
CREATE INDEX outbox_claim_order ON outbox (domain_id, id) WHERE state IN ('pending', 'in_flight');
CREATE INDEX outbox_finished ON outbox (updated_at) WHERE state IN ('done', 'cancelled');
-- One pending sync per (peer, entity): a sync delivers home's state at the time it runs.
CREATE UNIQUE INDEX outbox_one_pending_sync ON outbox (domain_id, internal_id)
    WHERE state = 'pending' AND kind = 'sync';

-- What each push peer last received for each entity, in the peer's own terms (the diff base).
CREATE TABLE peer_copies (
    domain_id     text NOT NULL REFERENCES domains (id),
    internal_id   text NOT NULL REFERENCES entities (internal_id),
    document      jsonb NOT NULL,
    -- Set when the entity was suspended in the peer because home deleted it.
    suspended_at  timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (domain_id, internal_id)
);

-- How far the home poller has read each resource type (home's own meta.lastModified values).
CREATE TABLE home_watermarks (
    resource_type  text PRIMARY KEY,
    last_modified  text NOT NULL,
    -- IDs already seen at exactly last_modified (the next poll asks "ge", and skips these).
    seen_at_mark   text[] NOT NULL DEFAULT '{}',
    swept_at       timestamptz
);

-- Append-only audit trail, a hash chain (0013): each row's hash covers the one before it.
CREATE TABLE audit_log (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL,
    action    text NOT NULL,
    subject   text,
    details   jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Position in the chain, the previous row's hash, and sha256(prev_hash || canonical text).
    seq       bigint NOT NULL CONSTRAINT audit_log_seq_unique UNIQUE,
    prev_hash bytea NOT NULL,
    hash      bytea NOT NULL
);
CREATE INDEX audit_log_subject ON audit_log (subject, id);
CREATE INDEX id_mappings_domain_external_id ON id_mappings (domain_id, domain_external_id)
    WHERE domain_external_id IS NOT NULL;

CREATE FUNCTION broker_notify_mapping_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('broker_mappings', OLD.internal_id);
    RETURN NULL;
END
$$;

CREATE TRIGGER id_mappings_changed
    AFTER UPDATE OR DELETE ON id_mappings
    FOR EACH ROW EXECUTE FUNCTION broker_notify_mapping_change();

CREATE TRIGGER entities_changed
    AFTER UPDATE ON entities
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.merged_into IS DISTINCT FROM NEW.merged_into)
    EXECUTE FUNCTION broker_notify_mapping_change();

-- Workers wake as soon as work is enqueued.
CREATE FUNCTION broker_notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('broker_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_enqueued
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION broker_notify_outbox();

-- Change notification (0008).
-- What a domain wants to hear about, and how.
CREATE TABLE event_subscriptions (
    domain_id        text PRIMARY KEY REFERENCES domains (id) ON DELETE CASCADE,
    resource_types   text[] NOT NULL DEFAULT ARRAY['User', 'Group'],
    -- Attribute names of interest; NULL means all (creates and deletes are always of interest).
    attributes       text[],
    delivery         text NOT NULL
                     CONSTRAINT event_subscriptions_delivery_check CHECK (delivery IN ('push', 'poll')),
    -- Push: the domain's RFC 8935 receiver, and where its credential lives (never the secret).
    endpoint         text,
    credential_ref   text,
    -- notice: attribute names only; full: values too, filtered by the domain's read list.
    detail           text NOT NULL DEFAULT 'notice'
                     CONSTRAINT event_subscriptions_detail_check CHECK (detail IN ('notice', 'full')),
    -- Merge and split notices (the domain's alias now denotes its primary): only on request.
    identity_events  boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT event_subscriptions_push_needs_endpoint CHECK (delivery <> 'push' OR endpoint IS NOT NULL)
);

-- Each change in home the broker learnt of, once: its txn is the same in every domain's SET.
-- The document is home's resource after the change (internal IDs; never sent as it is), the
-- base the next change of the entity is compared with.
CREATE TABLE home_changes (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txn            uuid NOT NULL CONSTRAINT home_changes_txn_unique UNIQUE,
    internal_id    text NOT NULL REFERENCES entities (internal_id),
    kinds          text[] NOT NULL,
    attributes     text[] NOT NULL DEFAULT '{}',
    document       jsonb,
    origin         text,
    at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX home_changes_by_entity ON home_changes (internal_id, id);
CREATE INDEX home_changes_by_age ON home_changes (at);

-- Keys the broker signs SETs with. The private key is sealed (AES-256-GCM, the outbox key);
-- the newest key signs; an older one stays published while SETs it signed may be pending.
CREATE TABLE signing_keys (
    kid          text PRIMARY KEY,
    private_key  bytea NOT NULL,
    public_jwk   jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- One SET per (domain, change): the signed token once made (a retransmission sends the same
-- bytes), and whether the domain has it.
CREATE TABLE security_events (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    domain_id        text NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    change_id        bigint NOT NULL REFERENCES home_changes (id),
    internal_id      text NOT NULL REFERENCES entities (internal_id),
    jti              text NOT NULL CONSTRAINT security_events_jti_unique UNIQUE,
    token            text,
    kid              text REFERENCES signing_keys (kid),
    -- pending: not yet sent; sent: polled or pushed, not acknowledged; acknowledged; failed (the
    -- domain reported an error, or it was undeliverable); skipped (out of the domain's scope).
    state            text NOT NULL DEFAULT 'pending'
                     CONSTRAINT security_events_state_check
                     CHECK (state IN ('pending', 'sent', 'acknowledged', 'failed', 'skipped')),
    error            jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz,
    settled_at       timestamptz,
    CONSTRAINT security_events_once UNIQUE (domain_id, change_id)
);
CREATE INDEX security_events_unsettled ON security_events (domain_id, id)
    WHERE state IN ('pending', 'sent');
CREATE INDEX security_events_by_key ON security_events (kid) WHERE state IN ('pending', 'sent');
CREATE INDEX security_events_settled ON security_events (settled_at)
    WHERE state IN ('acknowledged', 'skipped');
CREATE INDEX security_events_by_change ON security_events (change_id);

-- Long polls wake when a domain has new events.
CREATE FUNCTION broker_notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d text;
BEGIN
    FOR d IN SELECT DISTINCT domain_id FROM new_events LOOP
        PERFORM pg_notify('broker_events', d);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER security_events_added
    AFTER INSERT ON security_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION broker_notify_events();

-- Domain lifecycle and the key's fingerprint (0012).
-- Every process keeps its caches of domains (settings, tokens) true: a change of what a domain
-- may do, or of how it is reached, is announced on channel broker_domains with the domain's name.
CREATE FUNCTION broker_notify_domain_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('broker_domains', OLD.id);
    RETURN NULL;
END
$$;

CREATE TRIGGER domains_changed
    AFTER UPDATE ON domains
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.scim_url IS DISTINCT FROM NEW.scim_url
          OR OLD.credential_ref IS DISTINCT FROM NEW.credential_ref
          OR OLD.push IS DISTINCT FROM NEW.push
          OR OLD.scope_filter IS DISTINCT FROM NEW.scope_filter
          OR OLD.attribute_policy IS DISTINCT FROM NEW.attribute_policy
          OR OLD.deprovision IS DISTINCT FROM NEW.deprovision
          OR OLD.suspend_for IS DISTINCT FROM NEW.suspend_for
          OR OLD.on_conflict IS DISTINCT FROM NEW.on_conflict
          OR OLD.unlinkable IS DISTINCT FROM NEW.unlinkable
          OR OLD.timestamp_precision IS DISTINCT FROM NEW.timestamp_precision)
    EXECUTE FUNCTION broker_notify_domain_change();

CREATE TRIGGER domains_removed
    AFTER DELETE ON domains
    FOR EACH ROW EXECUTE FUNCTION broker_notify_domain_change();

-- The fingerprint of the key that seals write-only values and signing keys (broker/secrets.py):
-- HMAC-SHA256 of a fixed label under the key, never the key. The first process to start records
-- it; a process with another key refuses to start.
CREATE TABLE broker_key (
    one          boolean PRIMARY KEY DEFAULT true CONSTRAINT broker_key_one CHECK (one),
    fingerprint  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The audit chain's head (0013): the last position and hash, so a deleted tail is detected.
CREATE TABLE audit_chain (
    singleton  boolean PRIMARY KEY DEFAULT true CONSTRAINT audit_chain_one_row CHECK (singleton),
    last_seq   bigint NOT NULL DEFAULT 0,
    last_hash  bytea NOT NULL DEFAULT decode(repeat('00', 32), 'hex'),
    -- The hash before the last (the last row's prev_hash): one UPDATE moves the head.
    prev_hash  bytea
);
INSERT INTO audit_chain DEFAULT VALUES;

CREATE FUNCTION broker_audit_field(value text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN value IS NULL THEN '-' ELSE length(value) || ':' || value END
$$;

CREATE FUNCTION broker_audit_canonical(
    id bigint, seq bigint, at timestamptz, actor text, action text, subject text, details jsonb
) RETURNS bytea
LANGUAGE sql STABLE AS $$
    SELECT convert_to(
        'audit/1'
        || broker_audit_field(id::text) || broker_audit_field(seq::text)
        || broker_audit_field(to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
        || broker_audit_field(actor) || broker_audit_field(action)
        || broker_audit_field(subject) || broker_audit_field(details::text),
        'UTF8')
$$;

CREATE FUNCTION broker_audit_chain() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- One statement locks the head and moves it (SET reads the row as it was).
    UPDATE audit_chain
    SET last_seq = last_seq + 1,
        prev_hash = last_hash,
        last_hash = sha256(last_hash || broker_audit_canonical(
            NEW.id, last_seq + 1, NEW.at, NEW.actor, NEW.action, NEW.subject, NEW.details))
    WHERE singleton
    RETURNING last_seq, prev_hash, last_hash INTO STRICT NEW.seq, NEW.prev_hash, NEW.hash;
    RETURN NEW;
END
$$;

CREATE TRIGGER audit_log_chain
    BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION broker_audit_chain();

CREATE FUNCTION broker_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: its rows are never changed or deleted'
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION broker_audit_append_only();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION broker_audit_append_only();

-- What happened to each entity, kept [propagation] history_retention (independent of the
-- outbox purge): writes (home's, through the journal), deliveries settled (with the peer's
-- answer), SETs settled, merges and splits. Audit events are read from audit_log itself.
CREATE TABLE entity_history (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    internal_id  text NOT NULL,
    domain_id    text,
    kind         text NOT NULL
                 CONSTRAINT entity_history_kind_check
                 CHECK (kind IN ('write', 'delivery', 'set', 'merge', 'split')),
    status       text NOT NULL,
    details      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX entity_history_by_entity ON entity_history (internal_id, at, id);
CREATE INDEX entity_history_by_age ON entity_history (at);

-- Reconciliation (0015, docs/reconciliation.md).
-- How an existing peer account is recognised as a home entity's: attributes (in the peer's
-- terms) compared case-insensitively, for example {userName, emails.value}.
ALTER TABLE domains ADD COLUMN correlate text[] NOT NULL DEFAULT ARRAY['userName'];
-- Initial sync of a push domain: needed (the serving broker starts it), running, done, failed.
ALTER TABLE domains ADD COLUMN initial_sync text DEFAULT 'needed'
    CONSTRAINT domains_initial_sync_check CHECK (initial_sync IN ('needed', 'running', 'done', 'failed'));

-- One run: its options, where it is (phase, resource type, the peer's next startIndex), the
-- peer's size, and the counts per situation once classified.
CREATE TABLE reconciliations (
    id             uuid PRIMARY KEY REFERENCES operations (id),
    domain_id      text NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    dry_run        boolean NOT NULL,
    initial_sync   boolean NOT NULL DEFAULT false,
    options        jsonb NOT NULL,
    phase          text NOT NULL DEFAULT 'index'
                   CONSTRAINT reconciliations_phase_check
                   CHECK (phase IN ('index', 'peer', 'home', 'actions', 'done', 'stopped', 'failed')),
    resource_type  text NOT NULL DEFAULT 'User',
    cursor         integer NOT NULL DEFAULT 1,
    peer_total     integer NOT NULL DEFAULT 0,
    counts         jsonb NOT NULL DEFAULT '{}'::jsonb,
    reason         text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
-- At most one unfinished run per domain: a second start resumes it.
CREATE UNIQUE INDEX reconciliations_one_running ON reconciliations (domain_id)
    WHERE phase IN ('index', 'peer', 'home', 'actions');

-- Home's entities as the run read them, a page at a time (so that a peer's accounts are
-- matched by an indexed query, not a search of home each): the correlation keys
-- ("attribute=value", lower-cased), whether the domain's scope admits the entity, and home's
-- resource. Removed when the run ends.
CREATE TABLE reconciliation_home (
    run_id         uuid NOT NULL REFERENCES reconciliations (id) ON DELETE CASCADE,
    internal_id    text NOT NULL,
    resource_type  text NOT NULL,
    in_scope       boolean NOT NULL,
    keys           text[] NOT NULL,
    document       jsonb NOT NULL,
    PRIMARY KEY (run_id, internal_id)
);
CREATE INDEX reconciliation_home_keys ON reconciliation_home USING gin (keys);

-- What the run found: a peer account (external_id) or a home entity the peer lacks (internal_id
-- only), its situation, the action the run's options give it, and whether that was taken.
CREATE TABLE reconciliation_items (
    run_id         uuid NOT NULL REFERENCES reconciliations (id) ON DELETE CASCADE,
    seq            bigint GENERATED ALWAYS AS IDENTITY,
    resource_type  text NOT NULL,
    situation      text NOT NULL
                   CONSTRAINT reconciliation_items_situation_check
                   CHECK (situation IN ('linked', 'drifted', 'missing', 'unlinked', 'disputed',
                                        'unmatched', 'deleted', 'out_of_scope')),
    external_id    text,
    internal_id    text,
    action         text NOT NULL DEFAULT 'report',
    detail         jsonb NOT NULL DEFAULT '{}'::jsonb,
    done           boolean NOT NULL DEFAULT false,
    PRIMARY KEY (run_id, seq)
);
-- A page read again after a crash records nothing twice.
CREATE UNIQUE INDEX reconciliation_items_account ON reconciliation_items (run_id, external_id, resource_type)
    WHERE external_id IS NOT NULL;
CREATE UNIQUE INDEX reconciliation_items_entity ON reconciliation_items (run_id, internal_id)
    WHERE external_id IS NULL;
CREATE INDEX reconciliation_items_claimed ON reconciliation_items (run_id, internal_id)
    WHERE internal_id IS NOT NULL;
-- The run's actions not yet taken, in the order they are taken: users first (0023).
CREATE INDEX reconciliation_items_actionable
    ON reconciliation_items (run_id, (resource_type <> 'User'), seq)
    WHERE NOT done AND action <> 'report';
-- Entities an account disputed between several of them might be (never "missing").
CREATE INDEX reconciliation_items_candidates ON reconciliation_items
    USING gin ((detail -> 'candidates'));

-- The operator console's sign-in sessions (0018): the SHA-256 of the cookie's session ID.
CREATE TABLE console_sessions (
    id_hash     bytea PRIMARY KEY,
    token_id    bigint NOT NULL REFERENCES domain_tokens (id) ON DELETE CASCADE,
    actor       text NOT NULL,
    csrf        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    ended_at    timestamptz
);
CREATE INDEX console_sessions_token ON console_sessions (token_id);
