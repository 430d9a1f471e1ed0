-- Plugin registry: one row per installed plugin name. The component bytes live on disk,
-- content-addressed by sha256 under $KEEL_HOME/components.
CREATE TABLE plugins (
    name            TEXT PRIMARY KEY NOT NULL,
    version         TEXT NOT NULL,
    description     TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    -- The full `describe` result and the WASI imports the component declares, as JSON.
    info_json       TEXT NOT NULL,
    imports_json    TEXT NOT NULL,
    -- Granted capabilities and per-plugin limits, as JSON (keel_sandbox::Grants / Limits).
    grants_json     TEXT NOT NULL,
    limits_json     TEXT NOT NULL,
    installed_at    TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
