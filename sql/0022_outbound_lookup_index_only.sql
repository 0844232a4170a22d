-- 0022: the outbound look-up of a page reads the mapping table's index only.
--
-- lookup_outbound probes entities (merged_into, resource_type) and then id_mappings (the primary
-- row's external_id and domain_external_id) for each ID of a page. With the columns it reads
-- from id_mappings stored in the index it probes, that probe is an index-only scan: no visit to
-- the 10-million-row table's heap, one random page fewer per ID (docs/scaling.md, "The third
-- round"). is_primary is stored too: the planner takes an index-only scan only when every
-- column the query names is in the index. The keys are unchanged.
--
-- entities is left as it is: the first read of an imported entity records its type, and with
-- resource_type in an index that update could no longer be a heap-only (HOT) one; each would
-- add an index entry and clear its page's visibility bit, which sends an index-only scan to the
-- heap anyway until autovacuum comes (measured: 130 heap visits for 100 IDs after a burst of
-- first reads, against 100 with the plain key).
DROP INDEX id_mappings_one_primary;
CREATE UNIQUE INDEX id_mappings_one_primary
    ON id_mappings (internal_id, domain_id, (nullif(is_primary, false)))
    INCLUDE (is_primary, external_id, domain_external_id);
