-- 0018: the operator console (broker/console/). Its sign-in sessions, kept server-side: the
-- cookie holds a random session ID whose SHA-256 is stored here, never the token it was
-- exchanged for. A session ends at expires_at, at sign-out (ended_at), or as soon as its token
-- is revoked or expires (the lookup joins the token). csrf is the per-session token every form
-- carries. The read-only console:read scope is the operator's too: home domain tokens only.
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

CREATE OR REPLACE FUNCTION broker_admin_scope_is_home() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.scopes && ARRAY['admin', 'console:read']
       AND NOT EXISTS (SELECT 1 FROM domains WHERE id = NEW.domain_id AND kind = 'home') THEN
        RAISE EXCEPTION 'only a token of the home domain may hold the admin or console:read scope'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'domain_tokens_admin_is_home';
    END IF;
    RETURN NEW;
END
$$;
