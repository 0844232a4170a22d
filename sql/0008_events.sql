-- 0008: change notification with Security Event Tokens (RFC 8417, RFC 9967), pushed (RFC 8935)
-- or polled (RFC 8936).

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
