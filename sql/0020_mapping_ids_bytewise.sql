-- 0020: the mapping table at 10 million rows (docs/scaling.md).
--
-- IDs compare as bytes. Internal and external IDs, domain IDs and correlation handles are opaque:
-- no order among them means anything, and only equality is ever asked. Under a linguistic
-- collation (the server's default, C.UTF-8 or en_US.UTF-8) every sort and every index build
-- compares them through strcoll(); under "C" they compare with memcmp() and sort on abbreviated
-- keys. A 10-million-row import sorts the rows once and builds four indexes on these columns.
-- The trigger of 0003 names merged_into, whose type cannot change under it: made again as it was.
DROP TRIGGER entities_changed ON entities;
ALTER TABLE entities
    ALTER COLUMN internal_id TYPE text COLLATE "C",
    ALTER COLUMN merged_into TYPE text COLLATE "C";
ALTER TABLE id_mappings
    ALTER COLUMN internal_id TYPE text COLLATE "C",
    ALTER COLUMN domain_id TYPE text COLLATE "C",
    ALTER COLUMN external_id TYPE text COLLATE "C",
    ALTER COLUMN domain_external_id TYPE text COLLATE "C",
    ALTER COLUMN correlation_handle TYPE text COLLATE "C";
CREATE TRIGGER entities_changed
    AFTER UPDATE ON entities
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.merged_into IS DISTINCT FROM NEW.merged_into)
    EXECUTE FUNCTION broker_notify_mapping_change();

-- One index by entity where there were two with the same columns: id_mappings_by_entity
-- (internal_id, domain_id), for reads, and the partial unique id_mappings_one_primary (the same
-- columns WHERE is_primary), for the invariant. The unique index on (internal_id, domain_id,
-- nullif(is_primary, false)) does both: a primary row's third key is true, so two primaries of
-- an entity in a domain clash; an alias's is NULL, and NULLs never clash. Every read by entity
-- uses its first two columns. At 10 million rows that is one index build and 560 MB fewer.
DROP INDEX id_mappings_by_entity;
DROP INDEX id_mappings_one_primary;
CREATE UNIQUE INDEX id_mappings_one_primary
    ON id_mappings (internal_id, domain_id, (nullif(is_primary, false)));
