-- 0015: reconciliation (docs/reconciliation.md): correlation rules per domain, runs that read a
-- peer page by page (resumable: the cursor is kept here), what each account and entity was found
-- to be, and the initial sync of a push domain added to a home that holds entities already.

-- How an existing peer account is recognised as a home entity's: attributes (in the peer's
-- terms) compared case-insensitively, for example {userName, emails.value}.
ALTER TABLE domains ADD COLUMN correlate text[] NOT NULL DEFAULT ARRAY['userName'];
-- Initial sync of a push domain: needed (the serving broker starts it), running, done, failed.
-- Push domains that exist already have been delivered to all along: done.
ALTER TABLE domains ADD COLUMN initial_sync text
    CONSTRAINT domains_initial_sync_check CHECK (initial_sync IN ('needed', 'running', 'done', 'failed'));
UPDATE domains SET initial_sync = 'done' WHERE push;
ALTER TABLE domains ALTER COLUMN initial_sync SET DEFAULT 'needed';

-- A reconciliation is an operation (broker operations) too.
ALTER TABLE operations DROP CONSTRAINT operations_kind_check;
ALTER TABLE operations ADD CONSTRAINT operations_kind_check
    CHECK (kind IN ('merge', 'split', 'reconcile'));

-- An orphan account a reconciliation deprovisions belongs to no entity: its outbox row names none.
ALTER TABLE outbox ALTER COLUMN internal_id DROP NOT NULL;

-- One run: its options, where it is (phase, resource type, the peer's next startIndex), the
-- peer's size, and the counts per situation once classified.
CREATE TABLE reconciliations (
    id             uuid PRIMARY KEY REFERENCES operations (id),
    domain_id      text NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    dry_run        boolean NOT NULL,
    initial_sync   boolean NOT NULL DEFAULT false,
    options        jsonb NOT NULL,
    phase          text NOT NULL DEFAULT 'index'
                   CONSTRAINT reconciliations_phase_check
                   CHECK (phase IN ('index', 'peer', 'home', 'actions', 'done', 'stopped', 'failed')),
    resource_type  text NOT NULL DEFAULT 'User',
    cursor         integer NOT NULL DEFAULT 1,
    peer_total     integer NOT NULL DEFAULT 0,
    counts         jsonb NOT NULL DEFAULT '{}'::jsonb,
    reason         text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
-- At most one unfinished run per domain: a second start resumes it.
CREATE UNIQUE INDEX reconciliations_one_running ON reconciliations (domain_id)
    WHERE phase IN ('index', 'peer', 'home', 'actions');

-- Home's entities as the run read them, a page at a time (so that a peer's accounts are
-- matched by an indexed query, not a search of home each): the correlation keys
-- ("attribute=value", lower-cased), whether the domain's scope admits the entity, and home's
-- resource. Removed when the run ends.
CREATE TABLE reconciliation_home (
    run_id         uuid NOT NULL REFERENCES reconciliations (id) ON DELETE CASCADE,
    internal_id    text NOT NULL,
    resource_type  text NOT NULL,
    in_scope       boolean NOT NULL,
    keys           text[] NOT NULL,
    document       jsonb NOT NULL,
    PRIMARY KEY (run_id, internal_id)
);
CREATE INDEX reconciliation_home_keys ON reconciliation_home USING gin (keys);

-- What the run found: a peer account (external_id) or a home entity the peer lacks (internal_id
-- only), its situation, the action the run's options give it, and whether that was taken.
CREATE TABLE reconciliation_items (
    run_id         uuid NOT NULL REFERENCES reconciliations (id) ON DELETE CASCADE,
    seq            bigint GENERATED ALWAYS AS IDENTITY,
    resource_type  text NOT NULL,
    situation      text NOT NULL
                   CONSTRAINT reconciliation_items_situation_check
                   CHECK (situation IN ('linked', 'drifted', 'missing', 'unlinked', 'disputed',
                                        'unmatched', 'deleted', 'out_of_scope')),
    external_id    text,
    internal_id    text,
    action         text NOT NULL DEFAULT 'report',
    detail         jsonb NOT NULL DEFAULT '{}'::jsonb,
    done           boolean NOT NULL DEFAULT false,
    PRIMARY KEY (run_id, seq)
);
-- A page read again after a crash records nothing twice.
CREATE UNIQUE INDEX reconciliation_items_account ON reconciliation_items (run_id, external_id, resource_type)
    WHERE external_id IS NOT NULL;
CREATE UNIQUE INDEX reconciliation_items_entity ON reconciliation_items (run_id, internal_id)
    WHERE external_id IS NULL;
CREATE INDEX reconciliation_items_claimed ON reconciliation_items (run_id, internal_id)
    WHERE internal_id IS NOT NULL;
-- Entities an account disputed between several of them might be (never "missing").
CREATE INDEX reconciliation_items_candidates ON reconciliation_items
    USING gin ((detail -> 'candidates'));
