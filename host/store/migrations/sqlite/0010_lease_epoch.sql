-- Lease fencing: every claim of a job increments its epoch (kept when the lease is released), and
-- every lease-guarded write names the epoch it was claimed under, so a host that lost a job can
-- no longer write to it even if the same owner id claimed it again since.
ALTER TABLE jobs ADD COLUMN lease_epoch INTEGER NOT NULL DEFAULT 0;
