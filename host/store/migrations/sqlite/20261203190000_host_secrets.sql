-- Secrets of this Keel home that must not live next to what they protect. `artifact-hmac` seals
-- the precompiled native code in `cache/`: kept here, whoever can write `cache/` (but not this
-- database) cannot forge a seal, where a key file inside `cache/` could simply be replaced.
CREATE TABLE host_secrets (
    name  TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;
