-- Write-behind of one-commit calls (`Batch::deferrable`): the commit appends the call's rows as
-- one record here (one small b-tree write instead of a dozen tables and indexes) and they are
-- written to their tables later, in the background or before any read or other write of the
-- kernel's tables, which therefore never sees them missing. `last_event_id` is the largest
-- event id the record reserved (its events get their ids when appended).
CREATE TABLE pending_writes (
    seq           INTEGER PRIMARY KEY,
    last_event_id INTEGER NOT NULL,
    record        TEXT NOT NULL
);
-- A pending record that could not be applied (a defect: such records cannot be refused), kept
-- for inspection instead of blocking every later write.
CREATE TABLE failed_writes (
    seq       INTEGER PRIMARY KEY,
    record    TEXT NOT NULL,
    error     TEXT NOT NULL,
    failed_at INTEGER NOT NULL
);
