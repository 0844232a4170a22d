-- 0014: acknowledged (and skipped) SETs are purged after [events] acknowledged_retention, and the
-- recorded home changes no SET names any more after [events] changes_retention; the purges find
-- them by age, and a change's SETs by the change, without reading the rest of either table.
CREATE INDEX security_events_settled ON security_events (settled_at)
    WHERE state IN ('acknowledged', 'skipped');
CREATE INDEX security_events_by_change ON security_events (change_id);
CREATE INDEX home_changes_by_age ON home_changes (at);
