-- 0012: the domain lifecycle, and one key for all processes.
--
-- A removed domain whose mappings were kept (`broker domain remove NAME --keep-mappings`) stays
-- as a row in state 'removed': no tokens, no deliveries, no subscriptions, but its external IDs
-- still name their entities, so adding the domain again under its name gives it back the same
-- IDs.
ALTER TABLE domains DROP CONSTRAINT domains_status_check;
ALTER TABLE domains ADD CONSTRAINT domains_status_check
    CHECK (status IN ('active', 'quarantined', 'disabled', 'removed'));

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
