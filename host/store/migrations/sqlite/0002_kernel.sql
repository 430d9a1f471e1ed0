-- Kernel state: jobs, actions, runtime events, ledger, budgets, reservations.
-- Timestamps are INTEGER microseconds since the Unix epoch (UTC) so comparisons are numeric.
-- Costs are INTEGER nano-units (keel_kernel::ledger::cost_to_nanos): exact, summable, never REAL.

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY NOT NULL,
    tenant           TEXT NOT NULL,
    principal        TEXT,
    session          TEXT,
    run_id           TEXT,
    parent_id        TEXT REFERENCES jobs(id),
    kind             TEXT NOT NULL,
    state            TEXT NOT NULL,
    version          INTEGER NOT NULL,
    idempotency_key  TEXT,
    input_json       TEXT NOT NULL,
    progress         REAL NOT NULL,
    progress_message TEXT,
    turns            INTEGER NOT NULL,
    tool_calls       INTEGER NOT NULL,
    deadline         INTEGER,
    error_code       TEXT,
    error_message    TEXT,
    result_ref       TEXT,
    tags_json        TEXT NOT NULL,
    metadata_json    TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER
);
-- Race-free idempotency: the constraint, not a check-then-insert, decides.
CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_tenant_created ON jobs (tenant, created_at DESC, id DESC);
CREATE INDEX jobs_parent ON jobs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX jobs_deadline ON jobs (deadline)
    WHERE deadline IS NOT NULL AND state IN ('QUEUED', 'RUNNING', 'WAITING_ACTION');

CREATE TABLE actions (
    id              TEXT PRIMARY KEY NOT NULL,
    job_id          TEXT NOT NULL REFERENCES jobs(id),
    tenant          TEXT NOT NULL,
    action_type     TEXT NOT NULL,
    state           TEXT NOT NULL,
    version         INTEGER NOT NULL,
    title           TEXT NOT NULL,
    request_json    TEXT NOT NULL,
    call_digest     TEXT,
    -- sha256 of the resume token; the token itself is never stored.
    token_hash      TEXT NOT NULL UNIQUE,
    resolution_json TEXT,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    resolved_at     INTEGER
);
CREATE INDEX actions_job ON actions (job_id, state);
CREATE INDEX actions_tenant ON actions (tenant, state, created_at);
CREATE INDEX actions_pending_expiry ON actions (expires_at) WHERE state = 'PENDING';

CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     TEXT NOT NULL REFERENCES jobs(id),
    tenant     TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    event_type TEXT NOT NULL,
    data_json  TEXT NOT NULL,
    at         INTEGER NOT NULL,
    UNIQUE (job_id, seq)
);
CREATE INDEX events_tenant ON events (tenant, id);

CREATE TABLE ledger_events (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
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
CREATE INDEX ledger_tenant_at ON ledger_events (tenant, at);
CREATE INDEX ledger_job ON ledger_events (job_id) WHERE job_id IS NOT NULL;
-- The ledger is append-only.
CREATE TRIGGER ledger_events_no_update BEFORE UPDATE ON ledger_events
BEGIN SELECT RAISE(ABORT, 'ledger_events is append-only'); END;
CREATE TRIGGER ledger_events_no_delete BEFORE DELETE ON ledger_events
BEGIN SELECT RAISE(ABORT, 'ledger_events is append-only'); END;

CREATE TABLE budgets (
    id          TEXT PRIMARY KEY NOT NULL,
    tenant      TEXT NOT NULL,
    -- keel_kernel::ledger::Budget as JSON (decimals as strings).
    budget_json TEXT NOT NULL
);
CREATE INDEX budgets_tenant ON budgets (tenant);

CREATE TABLE reservations (
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
);
CREATE INDEX reservations_held ON reservations (tenant, expires_at) WHERE state = 'HELD';
CREATE INDEX reservations_expiry ON reservations (expires_at) WHERE state = 'HELD';
