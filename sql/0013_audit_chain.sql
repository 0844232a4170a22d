-- 0013: a tamper-evident audit log, and each entity's history.
--
-- Every audit_log row carries the hash of the one before it (one chain, in the order of `seq`):
--   hash = sha256(prev_hash || canonical text of the row), the first prev_hash 32 zero bytes.
-- The canonical text is broker_audit_canonical() (length-prefixed fields, so no two rows share
-- one); broker/auditchain.py computes the same to verify. A BEFORE INSERT trigger chains every
-- row, whoever writes it, under the lock of the one-row chain head, which also keeps the last
-- position and hash: a deleted tail is detected too. The log is append-only: UPDATE, DELETE and
-- TRUNCATE are refused (someone with the rights to get past that is what the chain detects).
ALTER TABLE audit_log
    ADD COLUMN seq       bigint,
    ADD COLUMN prev_hash bytea,
    ADD COLUMN hash      bytea;

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

-- The rows already written are chained in the order they were written.
DO $$
DECLARE
    r record;
    previous bytea := decode(repeat('00', 32), 'hex');
    position bigint := 0;
    digest bytea;
BEGIN
    FOR r IN SELECT * FROM audit_log ORDER BY id LOOP
        position := position + 1;
        digest := sha256(previous || broker_audit_canonical(
            r.id, position, r.at, r.actor, r.action, r.subject, r.details));
        UPDATE audit_log SET seq = position, prev_hash = previous, hash = digest WHERE id = r.id;
        previous := digest;
    END LOOP;
    UPDATE audit_chain SET last_seq = position, last_hash = previous;
END
$$;

ALTER TABLE audit_log
    ALTER COLUMN seq SET NOT NULL,
    ALTER COLUMN prev_hash SET NOT NULL,
    ALTER COLUMN hash SET NOT NULL,
    ADD CONSTRAINT audit_log_seq_unique UNIQUE (seq);

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
