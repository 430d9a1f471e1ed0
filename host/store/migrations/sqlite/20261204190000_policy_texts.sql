-- A policy's text, stored once under its sha256: a job records its policy as a name and that
-- digest (`PolicyRef::version`), so a kilobytes-long policy is not copied into every job row (one
-- per direct tool call). Rows are never changed or removed: the key is the content's digest.
-- Jobs recorded before this table keep their policy's text in their input.
CREATE TABLE policy_texts (
    sha256 TEXT PRIMARY KEY NOT NULL,
    text   TEXT NOT NULL
);
