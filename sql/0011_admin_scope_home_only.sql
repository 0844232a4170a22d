-- 0010: the admin scope is the operator's, held only by tokens of the home domain (the
-- federation's owner, which sees internal IDs anyway); never by a peer's or a pull domain's
-- token, which would read internal IDs from the admin API. Tokens of other domains lose the
-- scope; those left with none are revoked. The broker also ignores the scope on such a token
-- when it authenticates one (broker/tokens.py), and refuses to issue one.
UPDATE domain_tokens t
SET scopes = array_remove(t.scopes, 'admin'),
    revoked_at = CASE WHEN cardinality(array_remove(t.scopes, 'admin')) = 0
                      THEN coalesce(t.revoked_at, now()) ELSE t.revoked_at END
FROM domains d
WHERE d.id = t.domain_id AND d.kind <> 'home' AND 'admin' = ANY (t.scopes);

CREATE FUNCTION broker_admin_scope_is_home() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF 'admin' = ANY (NEW.scopes)
       AND NOT EXISTS (SELECT 1 FROM domains WHERE id = NEW.domain_id AND kind = 'home') THEN
        RAISE EXCEPTION 'only a token of the home domain may hold the admin scope'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'domain_tokens_admin_is_home';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER domain_tokens_admin_is_home
    BEFORE INSERT OR UPDATE OF scopes, domain_id ON domain_tokens
    FOR EACH ROW EXECUTE FUNCTION broker_admin_scope_is_home();
