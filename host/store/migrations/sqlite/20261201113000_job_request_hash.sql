-- sha256 of the canonical request an idempotency key was first used with: the same key with a
-- different request is refused instead of silently answered with the first job.
ALTER TABLE jobs ADD COLUMN request_hash TEXT;
