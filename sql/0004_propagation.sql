-- 0004: delivery to push peers (broker/propagation/).

-- Each peer's deprovisioning and conflict policies, and how long it has been failing.
ALTER TABLE domains
    ADD COLUMN deprovision text NOT NULL DEFAULT 'delete'
        CONSTRAINT domains_deprovision_check CHECK (deprovision IN ('delete', 'suspend')),
    -- With deprovision = 'suspend': how long a resource stays suspended before it is deleted.
    ADD COLUMN suspend_for interval NOT NULL DEFAULT '30 days',
    -- A create the peer refuses with 409 uniqueness: link to the resource it already has, or
    -- dead-letter the delivery for a person to decide.
    ADD COLUMN on_conflict text NOT NULL DEFAULT 'dead_letter'
        CONSTRAINT domains_on_conflict_check CHECK (on_conflict IN ('link', 'dead_letter')),
    -- Set at the first failed delivery after a success, cleared by the next success.
    ADD COLUMN failing_since timestamptz,
    ADD COLUMN last_delivery_at timestamptz;

-- What each push peer last received for each entity, in the peer's own terms: the base of the
-- next update's diff.
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

-- One pending sync per (peer, entity): a sync delivers home's state at the time it runs, so a
-- second pending one would add nothing.
CREATE UNIQUE INDEX outbox_one_pending_sync ON outbox (domain_id, internal_id)
    WHERE state = 'pending' AND kind = 'sync';

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
