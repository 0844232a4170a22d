-- 0010: unlinkability beyond IDs. A domain marked unlinkable sees meta.created,
-- meta.lastModified and SET iat truncated to timestamp_precision seconds, so that home's
-- microseconds do not pair its IDs with another domain's (docs/security.md).
ALTER TABLE domains
    ADD COLUMN unlinkable boolean NOT NULL DEFAULT false,
    ADD COLUMN timestamp_precision integer NOT NULL DEFAULT 1
        CONSTRAINT domains_timestamp_precision_check CHECK (timestamp_precision BETWEEN 1 AND 86400);
