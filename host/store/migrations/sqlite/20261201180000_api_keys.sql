-- API keys of `keel serve`: one row per key. Only the sha256 of the key's secret is stored; the
-- key itself is shown once, at creation. `id` is the key's public prefix (it appears in the key
-- text and in logs), never the secret.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY NOT NULL,
    secret_sha256 TEXT NOT NULL,
    name        TEXT NOT NULL,
    scope       TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('read', 'write', 'admin')),
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

-- Which scope (tenant) owns a plugin installed through the HTTP API. A plugin without a row here
-- was installed from the CLI and is home-wide: visible to every scope.
CREATE TABLE plugin_owners (
    name        TEXT PRIMARY KEY NOT NULL REFERENCES plugins(name) ON DELETE CASCADE,
    scope       TEXT NOT NULL
);
