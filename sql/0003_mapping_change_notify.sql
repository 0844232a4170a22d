-- 0003: every change to an entity's mapping rows or state is announced on channel
-- broker_mappings (payload: the internal ID), so that each broker process can drop what it cached.
-- Inserts are not announced: caches hold only rows that exist, never misses.
CREATE FUNCTION broker_notify_mapping_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('broker_mappings', OLD.internal_id);
    RETURN NULL;
END
$$;

CREATE TRIGGER id_mappings_changed
    AFTER UPDATE OR DELETE ON id_mappings
    FOR EACH ROW EXECUTE FUNCTION broker_notify_mapping_change();

CREATE TRIGGER entities_changed
    AFTER UPDATE ON entities
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.merged_into IS DISTINCT FROM NEW.merged_into)
    EXECUTE FUNCTION broker_notify_mapping_change();
