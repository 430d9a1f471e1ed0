-- The agent loop's durability: job leases and the per-job journal.

-- Which host runs a job, until when (INTEGER microseconds). Claiming an expired lease is a
-- compare-and-set on `version` inside a BEGIN IMMEDIATE transaction.
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_until INTEGER;
CREATE INDEX jobs_claimable ON jobs (kind, created_at) WHERE state IN ('QUEUED', 'RUNNING');

-- Every non-deterministic input that entered a job, in commit order; a step (`key`) is
-- journaled at most once, so recovery never executes a journaled step again.
CREATE TABLE journal (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id       TEXT NOT NULL REFERENCES jobs(id),
    seq          INTEGER NOT NULL,
    key          TEXT NOT NULL,
    kind         TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    at           INTEGER NOT NULL,
    UNIQUE (job_id, seq),
    UNIQUE (job_id, key)
);
-- The journal is append-only.
CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal
BEGIN SELECT RAISE(ABORT, 'journal is append-only'); END;
CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal
BEGIN SELECT RAISE(ABORT, 'journal is append-only'); END;
