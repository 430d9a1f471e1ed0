-- Fewer b-trees per commit. Every b-tree a transaction touches is at least one more page
-- written to the WAL (two write syscalls each), and a governed call's two commits touched 33:
--  * no AUTOINCREMENT: events, journal and ledger_events are never deleted from, so a plain
--    INTEGER PRIMARY KEY (max(rowid) + 1) is just as monotonic, without the sqlite_sequence
--    page each commit rewrote. (Anything that ever deletes the newest rows must bring it back.)
--  * the journal is clustered on (job_id, seq), the order it is read in; its rowid was unused.
--  * reservations are clustered on their id (the only key they are looked up by), and the
--    expiry sweep reads the one partial index of live holds (only HELD rows are in it).
--  * the jobs listing index ascends: a new job then goes to the index's last leaf, which SQLite
--    appends to without rebalancing, where a descending one put it first and split pages
--    half-full. The listing (newest first) reads it backwards just as fast.

CREATE TABLE events_new (
    id         INTEGER PRIMARY KEY,
    job_id     TEXT NOT NULL REFERENCES jobs(id),
    tenant     TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    event_type TEXT NOT NULL,
    data_json  TEXT NOT NULL,
    at         INTEGER NOT NULL,
    UNIQUE (job_id, seq)
);
INSERT INTO events_new (id, job_id, tenant, seq, event_type, data_json, at)
    SELECT id, job_id, tenant, seq, event_type, data_json, at FROM events;
DROP TABLE events;
ALTER TABLE events_new RENAME TO events;
CREATE INDEX events_tenant ON events (tenant, id);

CREATE TABLE journal_new (
    job_id       TEXT NOT NULL REFERENCES jobs(id),
    seq          INTEGER NOT NULL,
    key          TEXT NOT NULL,
    kind         TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    at           INTEGER NOT NULL,
    PRIMARY KEY (job_id, seq),
    UNIQUE (job_id, key)
) WITHOUT ROWID;
INSERT INTO journal_new (job_id, seq, key, kind, payload_json, at)
    SELECT job_id, seq, key, kind, payload_json, at FROM journal;
DROP TABLE journal;
ALTER TABLE journal_new RENAME TO journal;

CREATE TABLE ledger_events_new (
    id             INTEGER PRIMARY KEY,
    kind           TEXT NOT NULL,
    tenant         TEXT NOT NULL,
    principal      TEXT,
    session        TEXT,
    job_id         TEXT,
    reservation_id TEXT,
    tokens         INTEGER NOT NULL,
    cost_nanos     INTEGER NOT NULL,
    requests       INTEGER NOT NULL,
    tool_calls     INTEGER NOT NULL,
    duration_ms    INTEGER,
    model          TEXT,
    tool           TEXT,
    data_json      TEXT NOT NULL,
    at             INTEGER NOT NULL
);
INSERT INTO ledger_events_new SELECT * FROM ledger_events;
DROP TABLE ledger_events;
ALTER TABLE ledger_events_new RENAME TO ledger_events;
CREATE INDEX ledger_tenant_at ON ledger_events (tenant, at);
CREATE INDEX ledger_job ON ledger_events (job_id) WHERE job_id IS NOT NULL;
-- The ledger is append-only.
CREATE TRIGGER ledger_events_no_update BEFORE UPDATE ON ledger_events
BEGIN SELECT RAISE(ABORT, 'ledger_events is append-only'); END;
CREATE TRIGGER ledger_events_no_delete BEFORE DELETE ON ledger_events
BEGIN SELECT RAISE(ABORT, 'ledger_events is append-only'); END;

CREATE TABLE reservations_new (
    id          TEXT PRIMARY KEY NOT NULL,
    tenant      TEXT NOT NULL,
    principal   TEXT,
    session     TEXT,
    job_id      TEXT,
    tokens      INTEGER NOT NULL,
    cost_nanos  INTEGER NOT NULL,
    requests    INTEGER NOT NULL,
    tool_calls  INTEGER NOT NULL,
    state       TEXT NOT NULL,
    actual_json TEXT,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    closed_at   INTEGER
) WITHOUT ROWID;
INSERT INTO reservations_new SELECT * FROM reservations;
DROP TABLE reservations;
ALTER TABLE reservations_new RENAME TO reservations;
CREATE INDEX reservations_held ON reservations (tenant, expires_at) WHERE state = 'HELD';

DROP INDEX jobs_tenant_created;
CREATE INDEX jobs_tenant_created ON jobs (tenant, created_at, id);
