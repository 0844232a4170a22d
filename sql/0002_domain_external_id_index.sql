-- 0002: filters on a domain's own externalId (externalId eq "...") resolve through this index.
CREATE INDEX id_mappings_domain_external_id ON id_mappings (domain_id, domain_external_id)
    WHERE domain_external_id IS NOT NULL;
